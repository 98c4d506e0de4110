"""`PrunedSampler`: the RS-Prune selection as a ``torch.utils.data.Sampler[int]`` for map-style data.

The dataset's item ``i`` must be global position ``i`` of the index (:class:`PrunedShardDataset`,
:class:`PrunedImageFolder`, or any dataset in the same order as the shards)::

    sampler = PrunedSampler(index, PruneConfig(prune_ratio=0.85), seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=8)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...

One epoch, per rank (all pure numpy, in :mod:`rsprune_data.partition`)::

    selected = index.select(config)                       # sorted global positions, cached per config
    order = epoch_order(selected, seed, epoch, shuffle)   # permutation from rng([seed, epoch])
    share = rank_share(order, num_replicas, rank, drop_last)  # DistributedSampler semantics

**DDP.** Rank ``r`` of ``R`` takes ``order[r::R]``. Without ``drop_last`` the order is padded by
wrapping around from its start to ``R * ceil(n / R)`` items, so a few samples appear twice in an
epoch (on different ranks); with ``drop_last`` its tail is cut to ``R * floor(n / R)``. Exactly what
``torch.utils.data.DistributedSampler`` does. ``num_replicas``/``rank`` default to the initialised
process group (then ``WORLD_SIZE``/``RANK``); explicit values win.

**Changing the ratio.** :meth:`set_config`/:meth:`set_prune_ratio` never change a pass in progress:
a pass keeps the selection it started with. The change applies at once when no pass of the current
epoch is running (before the first ``iter()`` after :meth:`set_epoch`, or after a pass was
exhausted), otherwise at the next :meth:`set_epoch` or ``iter()``. A *schedule*, a callable
``epoch -> PruneConfig | float``, is evaluated by :meth:`set_epoch`, so every rank and every rerun
uses the same config for the same epoch (a float ``r`` means ``PruneConfig(prune_ratio=r)``; return
``base.replace(prune_ratio=r)`` to keep other settings). :meth:`set_prune_ratio` replaces the ratio
of the current config and ends a schedule.
``len()`` is the length of the current pass, or of the next one when none is running.

**Resume.** :meth:`state_dict` is JSON-serialisable: ``{"format", "version", "epoch", "consumed",
"num_samples", "config", "seed", "shuffle", "drop_last", "num_replicas", "rank",
"index_fingerprint"}`` where ``consumed`` counts the items of this rank the sampler has handed out
in this epoch and ``num_samples`` is this rank's epoch length. :meth:`load_state_dict` refuses
(:class:`StateDictError`) a state from another index, seed, shuffle, drop_last, world size or, while
items of its epoch remain, config. ``rank`` is informational: ranks step in lockstep, so rank 0's
state resumes every rank. The training loop owns the epoch: a state taken inside an epoch sets the
epoch and makes the next pass continue it from ``consumed``; a later :meth:`set_epoch` to another
epoch abandons that position. A state taken at the end of an epoch leaves the sampler's epoch
alone: a pass of that same epoch yields nothing, a pass of any other epoch is a full one.

**Trainers.** A sampler that splits by rank (``num_replicas > 1``) refuses to be split again by
accelerate's ``BatchSamplerShard``/``DataLoaderDispatcher``, and any sampler refuses Lightning's
``DistributedSamplerWrapper`` (:mod:`rsprune_data.wrappers`); use
:mod:`rsprune_data.integrations` instead.

With torchdata's ``StatefulDataLoader`` resume is exact with any ``num_workers``: the loader saves
the sampler's state at the moment each batch's indices were drawn, so the prefetched batches are
not counted. With a plain ``DataLoader`` and workers the sampler runs ``prefetch_factor *
num_workers`` batches ahead of the model; pass the real count: ``state_dict(consumed=steps *
batch_size)``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol, cast

import numpy as np
import torch.utils.data
from numpy.typing import NDArray

from ._validate import check_int, check_number
from .config import PruneConfig, Schedule, as_config
from .errors import StateDictError
from .partition import epoch_order, per_rank, rank_share
from .plan import IndexArrays, check_servable
from .resume import check_config, check_same, state_header
from .state_check import check_sampler_state
from .world import distributed_rank
from .wrappers import LIGHTNING_SPLITTERS, refuse_wrapper

__all__ = ["ConfigSource", "PrunedSampler", "Schedule", "SelectableIndex"]

STATE_FORMAT = "rsprune-sampler"
STATE_VERSION = 1
_CACHE_SIZE = 4

#: A schedule: epoch -> config of that epoch, or just its pruning ratio.
#: What :class:`PrunedSampler` accepts as its config.
ConfigSource = PruneConfig | float | Schedule


class SelectableIndex(Protocol):
    """What the sampler needs from an index (:class:`rsprune_data.PruneIndex` is one)."""

    @property
    def fingerprint(self) -> str: ...

    def select(self, config: PruneConfig) -> NDArray[np.int64]: ...

    def __len__(self) -> int: ...


def _check_source(config: Any, what: str) -> ConfigSource:
    if isinstance(config, PruneConfig) or callable(config):
        return config  # type: ignore[no-any-return]
    return as_config(config, what)


class PrunedSampler(torch.utils.data.Sampler[int]):
    """Global positions selected by RS-Prune, shuffled per epoch and split across DDP ranks.

    See the module docstring for the DDP padding, ratio-change timing and resume semantics.

    Args:
        index: a :class:`rsprune_data.PruneIndex` (anything with ``select``, ``fingerprint``
            and ``len``).
        config: a :class:`PruneConfig`, a pruning ratio (default config with that ratio), or a
            schedule ``epoch -> PruneConfig | float``.
        shuffle: permute the selection every epoch from ``(seed, epoch)``; else ascending order.
        seed: seed of the epoch permutation; must be the same on every rank.
        num_replicas: world size; default from ``torch.distributed`` / ``WORLD_SIZE``, else 1.
        rank: this rank; default from ``torch.distributed`` / ``RANK``, else 0.
        drop_last: drop the tail instead of padding so that ranks get equal counts.

    Example:
        >>> sampler = PrunedSampler(index, 0.85, seed=0)  # doctest: +SKIP
        >>> loader = DataLoader(PrunedShardDataset(index), sampler=sampler)  # doctest: +SKIP
        >>> sampler.set_prune_ratio(0.7); sampler.set_epoch(1)  # applies from epoch 1  # doctest: +SKIP
    """

    def __init__(
        self,
        index: SelectableIndex,
        config: ConfigSource,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        check_int("seed", seed, 0)
        self.index = index
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.num_replicas = distributed_rank(rank, num_replicas)
        self._cache: OrderedDict[PruneConfig, NDArray[np.int64]] = OrderedDict()
        self._source: ConfigSource = _check_source(config, "config")
        self._next_source: ConfigSource | None = None  # a change waiting for the pass to end
        self._epoch = 0
        self._config = self._resolve(self._source, 0)
        # The latest pass: its id, config, length and how many items it has handed out.
        self._pass_id = 0
        self._running = False
        self._pass_config = self._config
        self._pass_len = 0
        self._consumed = 0
        self._pass_started_in_epoch = False
        # (epoch, consumed, epoch complete) from load_state_dict, for the next pass of that epoch
        self._resume: tuple[int, int, bool] | None = None
        self._warned = False  # "epoch cut short", once

    # ------------------------------------------------------------------ config and epoch
    @property
    def epoch(self) -> int:
        """The current epoch (set by :meth:`set_epoch`; ``iter()`` never changes it)."""
        return self._epoch

    @property
    def config(self) -> PruneConfig:
        """The config of the current pass, or of the next one when none is running."""
        return self._pass_config if self._running else self._config

    @property
    def selected(self) -> NDArray[np.int64]:
        """Sorted global positions selected by :attr:`config` (all ranks together)."""
        return self._select(self.config)

    def _resolve(self, source: ConfigSource, epoch: int) -> PruneConfig:
        if isinstance(source, PruneConfig):
            config = source
        elif callable(source):  # a ratio from a schedule means the default config with that ratio
            config = as_config(source(epoch), f"schedule({epoch})")
        else:
            config = as_config(source, "config")
        if hasattr(self.index, "num_clusters"):  # a PruneIndex: refuse here, not in a worker
            check_servable(cast("IndexArrays", self.index), config)
        return config

    def _select(self, config: PruneConfig) -> NDArray[np.int64]:
        hit = self._cache.get(config)
        if hit is not None:
            self._cache.move_to_end(config)
            return hit
        selected = np.asarray(self.index.select(config), dtype=np.int64)
        selected.setflags(write=False)
        self._cache[config] = selected
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return selected

    def _apply_pending(self) -> None:
        if self._next_source is not None:
            self._source, self._next_source = self._next_source, None
        self._config = self._resolve(self._source, self._epoch)

    def _guard(self) -> None:
        refuse_wrapper(
            f"PrunedSampler(num_replicas={self.num_replicas})",
            self.num_replicas,
            always=LIGHTNING_SPLITTERS,
        )

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: evaluates the schedule and applies any pending config change."""
        check_int("epoch", epoch, 0)
        self._guard()
        if (
            self._running
            and epoch != self._epoch
            and self._consumed < self._pass_len
            and not self._warned
        ):
            # Lightning with use_distributed_sampler=False keeps the first epoch's len() and stops
            # each later epoch there; the sampler only sees the next set_epoch arrive early.
            self._warned = True
            warnings.warn(
                f"set_epoch({epoch}) while epoch {self._epoch} has handed out only "
                f"{self._consumed} of its {self._pass_len} items: if the trainer cut the epoch "
                "short (Lightning caches the first epoch's len()), the rest was never trained on; "
                "use rsprune_data.integrations.lightning.PrunedDataModule",
                RuntimeWarning,
                stacklevel=2,
            )
        self._epoch = int(epoch)
        self._running = False
        self._pass_started_in_epoch = False
        self._apply_pending()
        if self._resume is not None and self._resume[0] != self._epoch:
            self._resume = None

    def set_config(self, config: ConfigSource) -> None:
        """Use ``config`` (a PruneConfig, ratio or schedule) from now on; see the module docstring.

        Applies at once unless a pass is running, else at the next :meth:`set_epoch` or ``iter()``.
        """
        source = _check_source(config, "config")
        if self._running:
            self._next_source = source
        else:
            self._source, self._next_source = source, None
            self._config = self._resolve(source, self._epoch)

    def set_prune_ratio(self, prune_ratio: float) -> None:
        """Shorthand for ``set_config(config.replace(prune_ratio=...))`` (ends any schedule)."""
        base = (
            self._config
            if self._next_source is None
            else self._resolve(self._next_source, self._epoch)
        )
        check_number("prune_ratio", prune_ratio, 0.0, 1.0, hi_open=True)
        self.set_config(base.replace(prune_ratio=prune_ratio))

    # ------------------------------------------------------------------ iteration
    def _num_samples(self, config: PruneConfig) -> int:
        return per_rank(int(self._select(config).shape[0]), self.num_replicas, self.drop_last)

    def __len__(self) -> int:
        self._guard()
        return self._pass_len if self._running else self._num_samples(self._config)

    def __iter__(self) -> Iterator[int]:
        self._guard()
        if self._next_source is not None:  # a change made during the previous pass
            self._apply_pending()
        config = self._config
        order = epoch_order(
            self._select(config), seed=self.seed, epoch=self._epoch, shuffle=self.shuffle
        )
        share = rank_share(order, self.num_replicas, self.rank, drop_last=self.drop_last)
        n = int(share.shape[0])
        start = 0
        if self._resume is not None:
            epoch, consumed, complete = self._resume
            if epoch == self._epoch:
                start = n if complete else min(consumed, n)
            self._resume = None
        self._pass_id += 1
        self._pass_config = config
        self._pass_len = n
        self._consumed = start
        self._running = True
        self._pass_started_in_epoch = True
        return self._yield(share[start:], self._pass_id)

    def _yield(self, rest: NDArray[np.int64], pass_id: int) -> Iterator[int]:
        # Counted before the item is handed out, so state_dict() taken right after next()
        # (what StatefulDataLoader does) includes it.
        for pos in rest.tolist():
            if self._pass_id == pass_id:
                self._consumed += 1
            yield pos
        if self._pass_id == pass_id:
            self._running = False
            self._apply_pending()

    # ------------------------------------------------------------------ state
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """This rank's position, JSON-serialisable (see the module docstring).

        Args:
            consumed: override the count of items of this epoch already used by the model (for a
                plain DataLoader with workers, where the sampler runs ahead by the prefetch).
        """
        started = self._pass_started_in_epoch
        config = self._pass_config if started else self._config
        length = self._pass_len if started else self._num_samples(config)
        done = self._consumed if started else 0
        if self._resume is not None and self._resume[0] == self._epoch and not started:
            done = length if self._resume[2] else min(self._resume[1], length)
        if consumed is not None:
            done = check_int("consumed", consumed, 0, length)
        return {
            **state_header(
                STATE_FORMAT, STATE_VERSION, self._epoch, config, self.index.fingerprint
            ),
            "consumed": done,
            "num_samples": length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (see the module docstring for the epoch rules).

        Raises:
            StateDictError: the state is malformed (a field of the wrong type or out of range:
                :func:`rsprune_data.state_check.check_sampler_state`), or was taken on another index, seed,
                shuffle, drop_last or world size, or (with items of its epoch left) config.
        """
        sd = check_sampler_state(state_dict, STATE_FORMAT, STATE_VERSION)  # field by field
        check_same(
            sd,
            {
                "index_fingerprint": str(self.index.fingerprint),
                "seed": self.seed,
                "shuffle": self.shuffle,
                "drop_last": self.drop_last,
                "num_replicas": self.num_replicas,
            },
            "PrunedSampler",
        )
        epoch, consumed, length = int(sd["epoch"]), int(sd["consumed"]), int(sd["num_samples"])
        if consumed < length:  # items of that epoch remain: they must come from the same config
            mine = self._resolve(
                self._source if self._next_source is None else self._next_source, epoch
            )
            check_config(sd, mine, "PrunedSampler")
            if self._num_samples(mine) != length:
                raise StateDictError(
                    f"the state's epoch has {length} items on this rank but the same config "
                    f"selects {self._num_samples(mine)} here: the index changed"
                )
            self._epoch = epoch
            self._apply_pending()
        self._running = False
        self._pass_started_in_epoch = False
        self._resume = (epoch, consumed, consumed >= length)

    def __repr__(self) -> str:
        return (
            f"PrunedSampler(n={len(self)}, epoch={self._epoch}, rank={self.rank}/"
            f"{self.num_replicas}, ratio={self.config.prune_ratio}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last})"
        )
