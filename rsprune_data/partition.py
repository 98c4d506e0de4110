"""Epoch orders and rank/worker splits of a selection: pure numpy, seed and epoch are arguments.

Two splits serve the two loaders:

* :func:`rank_share` has ``torch.utils.data.DistributedSampler`` semantics for the map-style
  :class:`~rsprune_data.PrunedSampler`: every rank gets ``ceil(n / R)`` items (the order padded by
  wrapping around from its start) or, with ``drop_last``, ``floor(n / R)`` (the tail dropped); rank
  ``r`` takes items ``r, r + R, r + 2R, ...``.
* :func:`contiguous_span` cuts a sequence into nearly equal contiguous spans, so a streaming worker
  reads neighbouring byte ranges of few shards (Megatron-Energon's global split over all workers).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch. ``[seed, epoch]`` seeds it: ``seed + epoch`` would collide."""
    return np.random.default_rng([int(seed), int(epoch)])


def epoch_order(
    items: NDArray[np.int64], *, seed: int, epoch: int, shuffle: bool
) -> NDArray[np.int64]:
    """``items`` permuted by ``(seed, epoch)``, or as given when ``shuffle`` is False."""
    if not shuffle:
        return items
    return items[epoch_rng(seed, epoch).permutation(items.shape[0])]


def check_rank(num_replicas: int, rank: int) -> None:
    """Raise :class:`ConfigError` unless ``0 <= rank < num_replicas``."""
    if num_replicas < 1:
        raise ConfigError(f"`num_replicas` must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ConfigError(f"`rank` must be in [0, {num_replicas}) (num_replicas), got {rank}")


def per_rank(n: int, num_replicas: int, drop_last: bool) -> int:
    """Items each rank gets from ``n``: ``floor(n/R)`` with ``drop_last``, else ``ceil(n/R)``."""
    return n // num_replicas if drop_last else -(-n // num_replicas)


def rank_share(
    order: NDArray[np.int64], num_replicas: int, rank: int, *, drop_last: bool = False
) -> NDArray[np.int64]:
    """Rank ``rank``'s items of ``order`` with DistributedSampler semantics (see module docstring).

    Example:
        >>> rank_share(np.arange(5), 2, 1).tolist()  # padded with item 0
        [1, 3, 0]
    """
    check_rank(num_replicas, rank)
    n = order.shape[0]
    each = per_rank(n, num_replicas, drop_last)
    total = each * num_replicas
    if n == 0 or total == 0:
        return order[:0]
    if total <= n:
        full = order[:total]
    else:  # pad by wrapping, as many times as needed when n < num_replicas
        full = np.resize(order, total)
    return full[rank::num_replicas]


def contiguous_span(n: int, parts: int, part: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``part`` when ``n`` items are cut into ``parts`` contiguous spans whose
    lengths differ by at most one (the first ``n % parts`` spans are one longer).

    Example:
        >>> [contiguous_span(10, 3, p) for p in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    check_rank(parts, part)
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)
