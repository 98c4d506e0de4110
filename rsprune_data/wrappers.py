"""Guards against trainer wrappers that would silently change what a loader delivers.

accelerate and Lightning wrap loaders to split them across processes. Our loaders already split
by rank, so a second split silently drops part of the selection (issue 9):

* accelerate (``accelerate/data_loader.py``): ``BatchSamplerShard`` deals a rank's batches out
  again over all processes; ``IterableDatasetShard`` keeps every ``num_processes``-th batch of an
  iterable dataset; ``DataLoaderDispatcher`` iterates on process 0 only and slices its batches
  over the processes (the default for an ``IterableDataset``).
* Lightning (``lightning/fabric/utilities/distributed.py``): ``DistributedSamplerWrapper`` wraps a
  custom sampler in ``DistributedSampler``, which splits it again and caches its length at
  construction (a ratio change then fails its ``total_size`` assertion).

The loaders never import the frameworks: :func:`find_wrapper` looks for those classes, by name, among
the objects whose methods are on the call stack (``self`` of the calling frames). Called once per
pass or ``set_epoch``/``len()``: a few dozen frames, microseconds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from .errors import ConfigError

__all__ = ["ACCELERATE_SPLITTERS", "LIGHTNING_SPLITTERS", "find_wrapper", "refuse_wrapper"]

#: accelerate's classes that split a loader across processes.
ACCELERATE_SPLITTERS = frozenset(
    {"BatchSamplerShard", "IterableDatasetShard", "DataLoaderDispatcher"}
)
#: Lightning's classes that split a sampler across processes.
LIGHTNING_SPLITTERS = frozenset({"DistributedSamplerWrapper", "_DatasetSamplerWrapper"})

_DEPTH = 48

_FIX = {
    "accelerate": (
        "build the loader as usual and call "
        "`loader = rsprune_data.integrations.accelerate.prepare_loader(accelerator, loader)` "
        "instead of passing it to `accelerator.prepare` (device placement, set_epoch and "
        "checkpointing included, without a second split)"
    ),
    "lightning": (
        "return it from `rsprune_data.integrations.lightning.PrunedDataModule` (or wrap it "
        "with `rsprune_data.integrations.PrunedLoader`), which Lightning never re-wraps, and "
        "build the Trainer with `reload_dataloaders_every_n_epochs=1`"
    ),
}


def find_wrapper(names: Iterable[str], *, depth: int = _DEPTH) -> str | None:
    """The class name of the first object of ``names`` with a method on the call stack, or None."""
    wanted = frozenset(names)
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if obj is not None and type(obj).__name__ in wanted:
            return type(obj).__name__
        frame = frame.f_back  # type: ignore[assignment]
    return None


def refuse_wrapper(what: str, world_size: int, *, always: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` if a splitting wrapper drives this rank-splitting loader.

    Args:
        what: the loader, for the message (``"PrunedSampler(num_replicas=2)"``).
        world_size: the loader's own split; accelerate's wrappers are harmless over one global
            order (``world_size == 1``), so they are refused only when it is > 1.
        always: wrapper names refused whatever the world size (Lightning's, whose cached length
            breaks ratio changes).
    """
    names = set(always) | (ACCELERATE_SPLITTERS | LIGHTNING_SPLITTERS if world_size > 1 else set())
    found = find_wrapper(names)
    if found is None:
        return
    framework = "accelerate" if found in ACCELERATE_SPLITTERS else "lightning"
    if found == "_DatasetSamplerWrapper":  # the inner half of DistributedSamplerWrapper
        found = "DistributedSamplerWrapper (Trainer(use_distributed_sampler=True))"
    if world_size > 1:
        why = (
            f"{what} already splits the selection over {world_size} ranks, and {framework}'s "
            f"{found} splits it again: part of every epoch would never be trained on, without "
            "a message"
        )
    else:
        why = (
            f"{what} is wrapped in Lightning's {found}, which re-splits it and caches its length "
            "when the loader is built: a ratio change then fails or is truncated to the first "
            "epoch's length"
        )
    raise ConfigError(f"{why}. Fix: {_FIX[framework]}.")
