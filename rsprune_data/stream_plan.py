"""The plan of one streaming epoch: which selected samples each rank and worker delivers (numpy only).

**Order.** Shards are permuted by ``rng([seed, epoch])`` (``shuffle_shards``) and laid out one after
the other, each shard's selected samples in tar order. With ``sample_window = w > 0`` that layout is
cut into windows of ``w`` consecutive shards (of the epoch's shard order) and the samples of window
``k`` are permuted by ``rng([seed, epoch, 1, k])``: a new sample-level order every epoch, the same on
every rank and for every worker count (it is fixed before the split), while a stretch of the
sequence only ever touches the ``w`` shards of its window. ``sample_window = 0`` keeps tar order
inside shards. The global sequence is that order. Like
``DistributedSampler`` it is padded by wrapping around from its start to ``R * ceil(n / R)`` items,
or cut to ``R * floor(n / R)`` with ``drop_last``, so every one of the ``R`` ranks delivers exactly
the same number of samples. Rank ``r`` takes the ``r``-th contiguous span of that sequence and its
``W`` DataLoader workers cut the span into ``W`` contiguous pieces whose lengths differ by at most
one (Megatron-Energon's global split of samples over all workers), so a piece may start or end
inside a shard and ``R * W`` may exceed the number of shards (webdataset issue #188).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .partition import contiguous_span, epoch_order, per_rank

__all__ = ["EpochPlan", "epoch_plan", "shard_runs", "worker_batches"]


@dataclass(frozen=True)
class EpochPlan:
    """Where every rank's and worker's samples come from in one epoch (module docstring).

    The global sequence is never built: item ``i`` of the padded sequence is item ``i mod n`` of
    the selected samples laid out shard by shard in ``shard_order``.

    Attributes:
        selected: sorted global positions selected (``n`` of them).
        first: per slot of the shard order, the index in ``selected`` of that shard's first sample.
        ends: per slot, the cumulative count of selected samples up to and including that shard.
        world_size: ranks sharing the epoch.
        per_rank: samples every rank delivers.
    """

    selected: NDArray[np.int64]
    first: NDArray[np.int64]
    ends: NDArray[np.int64]
    world_size: int
    per_rank: int
    seed: int = 0
    epoch: int = 0
    sample_window: int = 0

    @property
    def window_bounds(self) -> NDArray[np.int64]:
        """Item boundaries of the windows in the unpadded sequence: ``[0, ..., n]``.

        With ``sample_window = 0`` every shard is its own window (tar order is kept).
        """
        step = max(1, self.sample_window)
        inner = self.ends[step - 1 :: step]
        return np.unique(np.concatenate([[0], inner, self.ends[-1:]]).astype(np.int64))

    def _sequence_slot(self, j: NDArray[np.int64]) -> NDArray[np.int64]:
        """Unshuffled slot (shard-by-shard tar order) of sequence items ``j`` (each ``< n``)."""
        if self.sample_window <= 0 or j.shape[0] == 0:
            return j
        bounds = self.window_bounds
        win = np.searchsorted(bounds, j, side="right") - 1
        out = np.empty_like(j)
        for k in np.unique(win).tolist():
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            perm = np.random.default_rng([self.seed, self.epoch, 1, k]).permutation(hi - lo)
            mask = win == k
            out[mask] = lo + perm[j[mask] - lo]
        return out

    def rank_span(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of rank ``rank`` in the padded global sequence."""
        return rank * self.per_rank, (rank + 1) * self.per_rank

    def worker_span(self, rank: int, worker: int, num_workers: int) -> tuple[int, int]:
        """``[start, stop)`` of one DataLoader worker of ``rank`` in the padded global sequence."""
        a, b = contiguous_span(self.per_rank, num_workers, worker)
        base = self.rank_span(rank)[0]
        return base + a, base + b

    def positions(self, start: int, stop: int) -> NDArray[np.int64]:
        """Global positions of items ``[start, stop)`` of the padded global sequence."""
        n = int(self.selected.shape[0])
        if stop <= start or n == 0:
            return np.zeros(0, dtype=np.int64)
        j = self._sequence_slot(np.arange(start, stop, dtype=np.int64) % n)
        slot = np.searchsorted(self.ends, j, side="right")
        begins = self.ends - np.diff(self.ends, prepend=0)
        out: NDArray[np.int64] = self.selected[self.first[slot] + (j - begins[slot])]
        return out

    def blocks(
        self,
        start: int,
        stop: int,
        block: int,
        sizes: NDArray[np.int64] | None = None,
        max_bytes: int = 0,
    ) -> list[tuple[int, int]]:
        """Cut items ``[start, stop)`` into ``[a, b)`` read blocks: at most ``block`` items, and
        never across a window (so a block touches at most ``sample_window`` shards); ``block = 0``
        means whole windows. With ``sizes`` (the byte length of each of the items) and
        ``max_bytes > 0``, a block also holds at most ``max_bytes`` (or one item, if larger).
        Offsets are relative to ``start``.
        """
        n = int(self.selected.shape[0])
        if stop <= start or n == 0:
            return []
        j = np.arange(start, stop, dtype=np.int64) % n
        win = np.searchsorted(self.window_bounds, j, side="right")
        cuts = [0, *(np.flatnonzero(win[1:] != win[:-1]) + 1).tolist(), stop - start]
        out: list[tuple[int, int]] = []
        by_bytes = sizes is not None and max_bytes > 0 and block > 0
        ends = np.cumsum(sizes, dtype=np.int64) if by_bytes and sizes is not None else None
        for a, b in itertools.pairwise(cuts):
            step = b - a if block <= 0 else block
            if ends is None:
                out.extend((x, min(x + step, b)) for x in range(a, b, step))
                continue
            x = a
            while x < b:  # greedy: up to `step` items and `max_bytes` bytes, at least one item
                base = int(ends[x - 1]) if x else 0
                fit = int(np.searchsorted(ends[x:b], base + max_bytes, side="right"))
                y = x + max(1, min(step, fit))
                out.append((x, y))
                x = y
        return out


def epoch_plan(
    selected: NDArray[np.int64],
    shard_starts: NDArray[np.int64],
    *,
    seed: int,
    epoch: int,
    shuffle_shards: bool,
    world_size: int,
    drop_last: bool,
    sample_window: int = 0,
) -> EpochPlan:
    """The :class:`EpochPlan` of one epoch (see the module docstring for the order and split).

    Args:
        selected: sorted global positions (``PruneIndex.select``).
        shard_starts: ``[num_shards + 1]`` first global position of every shard, then the total.
        seed, epoch: the shard permutation comes from ``np.random.default_rng([seed, epoch])``.
        shuffle_shards: permute shards; else the order given.
        world_size: number of ranks.
        drop_last: cut the sequence to ``world_size * floor(n / world_size)`` instead of padding.
        sample_window: permute the samples of every ``sample_window`` consecutive shards of the
            epoch's shard order by ``rng([seed, epoch, 1, window])``; 0 keeps tar order.

    Example:
        >>> plan = epoch_plan(np.array([0, 2, 3, 5]), np.array([0, 3, 6]), seed=0, epoch=0,
        ...                   shuffle_shards=False, world_size=3, drop_last=False)
        >>> [plan.positions(*plan.rank_span(r)).tolist() for r in range(3)]
        [[0, 2], [3, 5], [0, 2]]
    """
    selected = np.asarray(selected, dtype=np.int64)
    starts = np.asarray(shard_starts, dtype=np.int64)
    order = epoch_order(
        np.arange(starts.shape[0] - 1, dtype=np.int64),
        seed=seed,
        epoch=epoch,
        shuffle=shuffle_shards,
    )
    lo = np.searchsorted(selected, starts[:-1])
    hi = np.searchsorted(selected, starts[1:])
    ends = np.cumsum((hi - lo)[order]).astype(np.int64)
    return EpochPlan(
        selected,
        lo[order].astype(np.int64),
        ends,
        world_size,
        per_rank(int(selected.shape[0]), world_size, drop_last),
        int(seed),
        int(epoch),
        int(sample_window),
    )


def worker_batches(per_rank_samples: int, num_workers: int, batch_size: int) -> list[int]:
    """Items each of a rank's ``num_workers`` workers yields when it batches its own samples.

    Example:
        >>> worker_batches(10, 3, 2)  # spans of 4, 3 and 3 samples
        [2, 2, 2]
    """
    w = max(1, num_workers)
    spans = (contiguous_span(per_rank_samples, w, v) for v in range(w))
    return [-(-(b - a) // batch_size) for a, b in spans]


def shard_runs(positions: NDArray[np.int64], shard_ids: NDArray[Any]) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` of maximal pieces of ``positions`` in one shard, in tar order."""
    if positions.shape[0] == 0:
        return []
    s = shard_ids[positions]
    cut = np.flatnonzero((s[1:] != s[:-1]) | (positions[1:] <= positions[:-1])) + 1
    bounds = [0, *cut.tolist(), int(positions.shape[0])]
    return [(int(s[a]), a, b) for a, b in itertools.pairwise(bounds)]
