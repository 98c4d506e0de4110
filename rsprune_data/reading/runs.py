"""Runs: nearby byte ranges of one file merged into single reads (numpy only).

Shape: sample ranges ``(offset[i], length[i])`` in file order -> :class:`Runs`, ``start[r]``,
``stop[r]`` and ``bounds`` such that samples ``bounds[r]:bounds[r + 1]`` lie inside
``[start[r], stop[r])``. One run is one ``pread`` (local) or one HTTP range request (remote), so
the gap bridged trades bytes read for calls made: :func:`coalesce` bridges gaps up to ``max_gap``
bytes and caps a run at ``max_block`` bytes (a single larger sample is still one run).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError

__all__ = ["Runs", "coalesce"]


@dataclass(frozen=True)
class Runs:
    """Byte runs of one file and the samples each one holds (module docstring).

    Attributes:
        start: ``[R]`` first byte of every run.
        stop: ``[R]`` end (exclusive) of every run.
        bounds: ``[R + 1]`` samples ``bounds[r]:bounds[r + 1]`` (in the order given) are in run r.
    """

    start: NDArray[np.int64]
    stop: NDArray[np.int64]
    bounds: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the runs read in all."""
        return int((self.stop - self.start).sum())


def coalesce(
    offsets: NDArray[np.int64], lengths: NDArray[np.int64], *, max_gap: int, max_block: int
) -> Runs:
    """Merge ranges in file order into runs (see the module docstring).

    Args:
        offsets: ``[n]`` first byte of each range, non-decreasing.
        lengths: ``[n]`` byte length of each range (>= 0).
        max_gap: largest gap in bytes between the end of one range and the start of the next that
            one run bridges.
        max_block: largest run in bytes (a longer single range is a run of its own).

    Raises:
        ConfigError: negative arguments, or offsets not in file order.

    Example:
        >>> r = coalesce(np.array([0, 100, 5000]), np.array([100, 50, 10]), max_gap=4096,
        ...              max_block=1 << 20)
        >>> r.start.tolist(), r.stop.tolist(), r.bounds.tolist()
        ([0, 5000], [150, 5010], [0, 2, 3])
    """
    off = np.asarray(offsets, dtype=np.int64)
    end = off + np.asarray(lengths, dtype=np.int64)
    if max_gap < 0 or max_block < 0:
        raise ConfigError(f"max_gap and max_block must be >= 0, got {max_gap} and {max_block}")
    n = int(off.shape[0])
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Runs(empty, empty, np.zeros(1, np.int64))
    if (off < 0).any() or (end < off).any():
        raise ConfigError("ranges must hold offsets >= 0 and lengths >= 0")
    if (np.diff(off) < 0).any():
        raise ConfigError("offsets must be in file order (sort the ranges before coalescing)")
    reach = np.maximum.accumulate(end)  # overlapping or repeated ranges extend a run
    cut = np.flatnonzero(off[1:] - reach[:-1] > max_gap) + 1
    bounds = np.concatenate(([0], cut, [n])).astype(np.int64)
    start = off[bounds[:-1]]
    stop = reach[bounds[1:] - 1]
    if (stop - start > max_block).any():  # rare: split oversized runs sequentially
        bounds = _cap(off, end, bounds, max_block)
        start = off[bounds[:-1]]
        stop = np.array([end[a:b].max() for a, b in itertools.pairwise(bounds)], dtype=np.int64)
    return Runs(start, stop, bounds)


def _cap(
    off: NDArray[np.int64], end: NDArray[np.int64], bounds: NDArray[np.int64], max_block: int
) -> NDArray[np.int64]:
    out = [0]
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        s, far = int(off[a]), int(end[a])
        for i in range(a + 1, b):
            if max(far, int(end[i])) - s > max_block:
                out.append(i)
                s, far = int(off[i]), int(end[i])
            else:
                far = max(far, int(end[i]))
        out.append(b)
    return np.asarray(out, dtype=np.int64)
