"""`PrunedLoader`: a DataLoader of a pruned loader that knows its epoch, its length and its position.

What every trainer integration needs, with no framework imported (the frameworks' own wrapping is
in :mod:`.accelerate` and :mod:`.lightning`):

* **epoch**: each ``iter()`` calls ``set_epoch(epoch)`` on the sampler or dataset (and on the
  wrapped loader when it has one, as accelerate's ``DataLoaderShard`` does); after a complete pass
  the epoch moves on by one, so a loop that never calls :meth:`PrunedLoader.set_epoch` still gets
  a new order and the schedule's next ratio every pass (accelerate's ``iteration`` semantics);
* **len()**: the batches of the current epoch (schedules and ratio changes included), the same on
  every rank;
* **check**: a pass that ends after another number of batches than its plan raises
  :class:`~rsprune_data.DeliveryError` (something between the loader and the model re-split it);
* **position**: ``state_dict()``/``load_state_dict()`` hold the epoch and the batches trained in
  it, and the sampler's or dataset's own state at that point (``PrunedSampler.state_dict(consumed=)``,
  ``PrunedWebDataset.state_dict(delivered=...)``), exact with any ``num_workers``: batches are
  counted where the training loop receives them, not where workers prefetch them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError, DeliveryError, StateDictError
from ..sampler import PrunedSampler
from ..wds import PrunedWebDataset

__all__ = ["PrunedLoader"]

STATE_FORMAT = "rsprune-loader"
STATE_VERSION = 1


def _unwrap_sampler(loader: Any) -> PrunedSampler | None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for _ in range(
            3
        ):  # BatchSampler(sampler), accelerate's SkipBatchSampler(BatchSampler(...))
            if isinstance(obj, PrunedSampler):
                return obj
            obj = getattr(obj, "sampler", None) or getattr(obj, "batch_sampler", None)
    return None


class PrunedLoader:
    """Iterate ``loader`` (a ``DataLoader`` over a :class:`PrunedSampler` or a
    :class:`PrunedWebDataset` pipeline) with the epoch, length, check and position described in the
    module docstring.

    Args:
        loader: the ``DataLoader`` (or accelerate's ``DataLoaderShard`` around it).
        batch_size: samples per batch of a streaming pipeline; default the ``DataLoader``'s
            ``batch_size``, else the ``n`` of the pipeline's ``.batched(n)``, else 1.

    Example:
        >>> loader = PrunedLoader(DataLoader(ds, sampler=PrunedSampler(index, 0.85), batch_size=8))  # doctest: +SKIP
        >>> for epoch in range(3):  # doctest: +SKIP
        ...     loader.set_epoch(epoch)
        ...     for batch in loader: ...
    """

    def __init__(self, loader: Any, *, batch_size: int | None = None) -> None:
        self.loader = loader
        self._sampler = _unwrap_sampler(loader)
        dataset = getattr(loader, "dataset", None)
        self._dataset = dataset if isinstance(dataset, PrunedWebDataset) else None
        if self._sampler is None and self._dataset is None:
            raise ConfigError(
                f"PrunedLoader needs a DataLoader whose sampler is a PrunedSampler or whose dataset "
                f"is a PrunedWebDataset pipeline, got sampler={getattr(loader, 'sampler', None)!r}, "
                f"dataset={type(dataset).__name__}: build it as in the README's Loaders section"
            )
        self.num_workers = int(getattr(loader, "num_workers", 0) or 0)
        if self._sampler is not None:
            bs = loader.batch_size
            if bs is None:
                bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
            self.batch_size = int(bs or 1)
            batch_sampler = getattr(loader, "batch_sampler", None)
            self._drop_last = bool(
                getattr(batch_sampler, "drop_last", getattr(loader, "drop_last", False))
            )
        else:
            assert self._dataset is not None
            if loader.batch_size is not None and self._dataset.batch_size is not None:
                raise ConfigError(
                    f"the pipeline is already .batched({self._dataset.batch_size}) and the DataLoader "
                    f"batches again (batch_size={loader.batch_size}): pass batch_size=None to the "
                    "DataLoader"
                )
            bs = batch_size or loader.batch_size or self._dataset.batch_size or 1
            self.batch_size = int(bs)
            self._drop_last = False
        target: Any = self._sampler if self._sampler is not None else self._dataset
        self._epoch = int(target.epoch)
        self._batches = 0  # batches of the current epoch handed to the training loop
        self._resumed: tuple[int, int] | None = None  # (epoch, batches) of a loaded state

    # ------------------------------------------------------------------ epoch and length
    @property
    def epoch(self) -> int:
        """The epoch of the current or next pass."""
        return self._epoch

    @property
    def batches(self) -> int:
        """Batches of the current epoch handed to the training loop so far (resumed ones included)."""
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch`` for the next pass, on the sampler or dataset and the wrapped loader."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"`epoch` must be an integer >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._batches = 0
        self._epoch = epoch
        if self._resumed is not None and self._resumed[0] != epoch:
            self._resumed = None
        set_loader_epoch = getattr(self.loader, "set_epoch", None)
        if callable(set_loader_epoch):  # accelerate's DataLoaderShard: its iteration, then ours
            set_loader_epoch(epoch)
        else:
            self._target.set_epoch(epoch)

    @property
    def _target(self) -> Any:
        return self._sampler if self._sampler is not None else self._dataset

    def __len__(self) -> int:
        """Batches of the current epoch, the same on every rank."""
        if self._sampler is not None:
            n = len(self._sampler)
            return n // self.batch_size if self._drop_last else -(-n // self.batch_size)
        assert self._dataset is not None
        return self._dataset.num_batches(self.batch_size, self.num_workers)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        self.set_epoch(self._epoch)
        expected = len(self)
        start = 0
        if self._resumed is not None:
            start = min(self._resumed[1], expected)
            self._resumed = None
        self._batches = start
        for batch in self.loader:
            self._batches += 1
            yield batch
        if self._batches != expected:
            raise DeliveryError(
                f"epoch {self._epoch} delivered {self._batches} batches on this rank but its plan has "
                f"{expected}: something between the loader and the training loop changed the stream "
                "(a second split by the trainer, a sampler or dataset replaced). Pass the plain "
                "DataLoader to PrunedLoader / prepare_loader and nothing else"
            )
        self.set_epoch(self._epoch + 1)

    # ------------------------------------------------------------------ state
    def state_dict(self, *, batches: int | None = None) -> dict[str, Any]:
        """The epoch and position, JSON-serialisable.

        Args:
            batches: batches of the current epoch the model has trained on (default: those this
                loader handed out; pass the trainer's count when it prefetches, as Lightning does).
        """
        k = self._batches if batches is None else int(batches)
        total = len(self)
        if not 0 <= k <= total:
            raise ConfigError(f"`batches` must be in [0, {total}] (epoch {self._epoch}), got {k}")
        if self._sampler is not None:
            position = self._sampler.state_dict(
                consumed=min(k * self.batch_size, len(self._sampler))
            )
        else:
            assert self._dataset is not None
            position = self._dataset.state_dict(
                delivered=k, batch_size=self.batch_size, num_workers=self.num_workers
            )
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches": k,
            "position": position,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next pass is the rest of the state's epoch."""
        sd = dict(state_dict)
        if sd.get("format") != STATE_FORMAT or not {"epoch", "batches", "position"} <= set(sd):
            raise StateDictError(
                f"not a PrunedLoader state (format={sd.get('format')!r}, keys "
                f"{sorted(sd)}): pass the dict returned by PrunedLoader.state_dict()"
            )
        if sd.get("version") != STATE_VERSION:
            raise StateDictError(
                f"PrunedLoader state version {sd.get('version')!r} is not supported "
                f"(this version reads {STATE_VERSION})"
            )
        self._target.load_state_dict(sd["position"])
        epoch, k = int(sd["epoch"]), int(sd["batches"])
        self._epoch = -1  # force set_epoch to reset the count
        self.set_epoch(epoch)
        self._resumed = (epoch, k)
        self._batches = k

    def __repr__(self) -> str:
        return (
            f"PrunedLoader(epoch={self._epoch}, batches={self._batches}/{len(self)}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"source={self._target!r})"
        )
