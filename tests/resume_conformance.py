"""One shared resume check for every stateful iterator (samplers, datasets, DataLoaders).

Modelled on torchdata's ``run_test_save_load_state`` (``test/nodes/utils.py``): iterate a reference
run of several epochs, then for each stop point of each epoch take ``state_dict()``, build a fresh
object, ``load_state_dict()`` and check that the rest of the stream (the rest of that epoch, then
the following epochs) is exactly the reference's.

The training loop owns the epoch, as with ``DistributedSampler``: before iterating epoch ``e`` the
loop calls ``set_epoch(obj, e)``. A resumed loop does the same, and calls it *before*
``load_state_dict`` (torchdata's ``StatefulDataLoader`` defers loading the sampler's state to
``iter(loader)``, so that is the order a real loop produces)::

    # reference                          # resumed after stopping in epoch e at point p
    for e in range(E + 1):               new = make(); set_epoch(new, e or e + 1 for "end")
        set_epoch(obj, e)                new.load_state_dict(state)
        for item in iterate(obj): ...    ... rest of the stream, set_epoch(new, e') per epoch

Stop points, per epoch of ``n`` items:

* ``"start"``: an iterator was created, nothing taken (0 consumed);
* ``"middle"``: ``n // 2`` taken;
* ``"last"``: ``n - 1`` taken (the last item still to come);
* ``"edge"``: all ``n`` taken, but the iterator has not yet raised ``StopIteration``: the loop
  is still inside the epoch, the rest of the epoch is empty;
* ``"end"``: the iterator raised ``StopIteration``: the loop has left the epoch and resumes at
  the next one (state taken after the inner loop, before the next ``set_epoch``);
* an ``int`` ``k``: ``k`` taken (skipped when ``k > n``).

Usage::

    from resume_conformance import run_resume_conformance

    run_resume_conformance(lambda: PrunedSampler(index, cfg, seed=3),
                           set_epoch=lambda s, e: s.set_epoch(e))
    run_resume_conformance(make_stateful_loader, key=lambda batch: batch["__key__"],
                           set_epoch=lambda dl, e: dl.sampler.set_epoch(e))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["STOP_POINTS", "ResumeReport", "Stateful", "run_resume_conformance", "stop_count"]

STOP_POINTS = ("start", "middle", "last", "edge", "end")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class ResumeReport:
    """What was checked: one ``(epoch, stop point, consumed)`` per resume, and the epoch lengths."""

    epoch_lengths: list[int]
    checked: list[tuple[int, str | int, int]] = field(default_factory=list)


def stop_count(point: str | int, n: int) -> int | None:
    """Items taken before the state is saved at ``point`` of an epoch of ``n`` items, or None to skip.

    ``"end"`` returns ``n`` too: it differs from ``"edge"`` only in the iterator having been exhausted.
    """
    if isinstance(point, int) and not isinstance(point, bool):
        return point if 0 <= point <= n else None
    counts = {"start": 0, "middle": n // 2, "last": n - 1, "edge": n, "end": n}
    if point not in counts:
        raise ValueError(f"unknown stop point {point!r}; use one of {STOP_POINTS} or an int")
    count = counts[point]
    return count if count >= 0 else None


def _no_epoch(obj: Any, epoch: int) -> None:
    del obj, epoch


def run_resume_conformance(
    make: Callable[[], Any],
    *,
    epochs: int = 2,
    stop_points: Sequence[str | int] = ("start", "middle", "edge", "end"),
    set_epoch: Callable[[Any, int], None] | None = None,
    iterate: Callable[[Any], Iterable[Any]] = iter,
    key: Callable[[Any], Any] | None = None,
    transport: Callable[[dict[str, Any]], dict[str, Any]] = copy.deepcopy,
    expect_nonempty: bool = True,
) -> ResumeReport:
    """Check that saving and loading state mid-stream resumes the exact same stream.

    Args:
        make: builds a fresh, identically configured stateful object (sampler, dataset or loader)
            with ``state_dict()``/``load_state_dict()``.
        epochs: epochs in which to stop; the reference runs one more so that ``"end"`` of the
            last stopped epoch has a next epoch to compare.
        stop_points: see the module docstring.
        set_epoch: ``set_epoch(obj, e)`` called before every epoch (and before loading a state);
            None for objects without epochs (every "epoch" is then a plain re-iteration).
        iterate: ``obj -> iterable`` of one epoch (``iter`` for samplers/loaders).
        key: maps each yielded item to a comparable value (for example the ``__key__`` list of a
            batch); identity by default.
        transport: applied to the state before loading it (deep copy by default; pass a JSON or
            ``torch.save`` round trip to check serialisability too).
        expect_nonempty: fail if an epoch of the reference is empty (a vacuous test).

    Returns:
        A :class:`ResumeReport` of what was checked. Raises ``AssertionError`` on any difference.
    """
    set_ep = _no_epoch if set_epoch is None else set_epoch
    as_key = (lambda x: x) if key is None else key

    def run_epoch(obj: Any, epoch: int) -> list[Any]:
        set_ep(obj, epoch)
        return [as_key(x) for x in iterate(obj)]

    ref_obj = make()
    reference = [run_epoch(ref_obj, e) for e in range(epochs + 1)]
    del ref_obj
    lengths = [len(r) for r in reference]
    if expect_nonempty and not all(lengths):
        raise AssertionError(f"reference epochs must not be empty, got lengths {lengths}")
    report = ResumeReport(epoch_lengths=lengths)

    for epoch in range(epochs):
        n = lengths[epoch]
        for point in stop_points:
            k = stop_count(point, n)
            if k is None:
                continue
            # --- run to the stop point on a fresh object, through the earlier epochs
            obj = make()
            for e in range(epoch):
                run_epoch(obj, e)
            set_ep(obj, epoch)
            it = iter(iterate(obj))
            taken = [as_key(next(it)) for _ in range(k)]
            if taken != reference[epoch][:k]:
                raise AssertionError(
                    f"epoch {epoch}: a second run differs from the reference before the stop "
                    f"point {point!r} (not deterministic): {taken[:8]} vs {reference[epoch][:8]}"
                )
            if point == "end":
                rest_now = [as_key(x) for x in it]
                if rest_now:
                    raise AssertionError(
                        f"epoch {epoch}: iterator yielded {len(rest_now)} items past the reference "
                        f"length {n}"
                    )
            state = transport(obj.state_dict())
            del it, obj

            # --- resume on a fresh object and compare the rest of the stream
            new = make()
            resume_epoch = epoch + 1 if point == "end" else epoch
            set_ep(new, resume_epoch)
            new.load_state_dict(state)
            got = [as_key(x) for x in iterate(new)]
            want = reference[resume_epoch] if point == "end" else reference[epoch][k:]
            if got != want:
                raise AssertionError(
                    f"epoch {epoch}, stop point {point!r} ({k} of {n} consumed): resumed stream "
                    f"differs from the reference ({len(got)} vs {len(want)} items; first got "
                    f"{got[:6]}, want {want[:6]})"
                )
            for e in range(resume_epoch + 1, epochs + 1):
                got = run_epoch(new, e)
                if got != reference[e]:
                    raise AssertionError(
                        f"after resuming epoch {epoch} at {point!r}: epoch {e} differs from the "
                        f"reference ({len(got)} vs {len(reference[e])} items)"
                    )
            report.checked.append((epoch, point, k))
    return report
