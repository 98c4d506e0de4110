"""The RS-Prune selection and its comparison baselines: pure numpy, no I/O, no global RNG.

RS-Prune (Wei, Dong et al., "RS-Prune: Training-Free Data Pruning at High Ratios for Efficient Remote
Sensing Diffusion Foundation Models") selects a training subset in two stages.

Budget: ``B = floor((1 - prune_ratio) * N + 0.5)`` where N counts every sample of the index.

Stage I (information): candidates are the valid samples that survive an entropy filter, either

* ``entropy_keep = f``: the ``m = min(floor(f * N + 0.5), N_valid)`` valid samples of highest entropy,
* ``entropy_threshold = t``: the valid samples with entropy ``H >= t``,
* neither: every valid sample.

Stage II (scene-aware stratified sampling) over the K reference clusters, with ``z`` the cluster id
and ``s`` the cosine similarity to that cluster's centroid:

1. ``q = floor(B / K)``; from every cluster take its ``q`` candidates of highest ``s`` (a cluster with
   fewer than ``q`` candidates gives all of them);
2. fill the remaining budget ``B - taken`` from all candidates not yet taken, by descending ``s``.

If there are no more than B candidates, all of them are returned (a shortfall, never padded). Every
"highest" breaks ties by the lower global position, so the result, a sorted int64 array of global
positions, is the same on every machine. Invalid samples (undecodable) are never candidates.

Implementation: O(N) grouping (a radix sort of 16-bit cluster ids) plus per-cluster partial sorts
(``np.partition``) with exact tie handling; no full sort of the similarities and no loop over samples.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._validate import check_int, check_number
from .errors import ConfigError

Positions = NDArray[np.int64]


def budget(n: int, prune_ratio: float) -> int:
    """The number of samples kept: ``floor((1 - prune_ratio) * n + 0.5)``.

    Example:
        >>> budget(1000, 0.85)
        150
    """
    return math.floor((1.0 - prune_ratio) * n + 0.5)


def _top_mask(values: NDArray[Any], m: int) -> NDArray[np.bool_]:
    """Mask of the ``m`` largest ``values``, ties broken by the lower index; O(n)."""
    n = values.shape[0]
    mask = np.zeros(n, dtype=bool)
    if m <= 0:
        return mask
    if m >= n:
        mask[:] = True
        return mask
    kth = n - m
    thr = np.partition(values, kth)[kth]  # the m-th largest value
    np.greater(values, thr, out=mask)
    need = m - int(np.count_nonzero(mask))
    if need > 0:
        mask[np.flatnonzero(values == thr)[:need]] = True
    return mask


def _top_positions(values: NDArray[Any], m: int) -> Positions:
    """Sorted indices of the ``m`` largest ``values`` (ties to the lower index)."""
    return np.flatnonzero(_top_mask(values, m)).astype(np.int64, copy=False)


def _group_by_cluster(
    z: NDArray[np.integer[Any]], counts: NDArray[np.intp]
) -> tuple[NDArray[np.intp], NDArray[np.int64]]:
    """Order that groups ``z`` by cluster (stable: ascending index within a group), and group starts.

    Cluster ids are narrowed to int16 when K allows it, where numpy's stable sort is a radix sort.
    """
    num_clusters = counts.shape[0]
    key = z.astype(np.int16, copy=False) if num_clusters <= np.iinfo(np.int16).max else z
    order = np.argsort(key, kind="stable")
    starts = np.zeros(num_clusters + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return order, starts


def _stratified(
    z: NDArray[np.integer[Any]], s: NDArray[np.floating[Any]], num_clusters: int, b: int
) -> NDArray[np.bool_]:
    """Stage II over candidates (arrays in ascending position order): mask of the B selected."""
    n = z.shape[0]
    if n <= b:
        return np.ones(n, dtype=bool)
    q = b // num_clusters
    taken = np.zeros(n, dtype=bool)
    if q > 0:
        counts = np.bincount(z, minlength=num_clusters)
        small = counts <= q
        if small.any():
            taken = small[z]  # clusters with at most q candidates give all of them
        big = np.flatnonzero(~small)
        if big.size:
            order, starts = _group_by_cluster(z, counts)
            s_grouped = s[order]
            for k in big.tolist():  # loop over clusters, never over samples
                lo, hi = starts[k], starts[k + 1]
                taken[order[lo:hi][_top_mask(s_grouped[lo:hi], q)]] = True
    rest = np.flatnonzero(~taken)
    left = b - (n - rest.size)
    if left > 0:
        taken[rest[_top_mask(s[rest], left)]] = True
    return taken


def _as_1d(name: str, a: ArrayLike, n: int | None) -> NDArray[Any]:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ConfigError(f"`{name}` must be a 1-d array, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ConfigError(f"`{name}` must have {n} entries like `entropy`, got {arr.shape[0]}")
    return arr


class _Inputs:
    """Validated selection inputs shared by all strategies."""

    def __init__(
        self,
        entropy: ArrayLike,
        cluster_ids: ArrayLike,
        similarity: ArrayLike,
        num_clusters: int,
        valid: ArrayLike | None,
    ) -> None:
        self.entropy = _as_1d("entropy", entropy, None)
        n = self.entropy.shape[0]
        self.cluster_ids = _as_1d("cluster_ids", cluster_ids, n)
        self.similarity = _as_1d("similarity", similarity, n)
        self.num_clusters = check_int("num_clusters", num_clusters, 1)
        if self.cluster_ids.size == 0:
            self.cluster_ids = self.cluster_ids.astype(np.int64)
        elif not np.issubdtype(self.cluster_ids.dtype, np.integer):
            raise ConfigError(
                f"`cluster_ids` must be an integer array, got dtype {self.cluster_ids.dtype}"
            )
        self.n = n
        if valid is None:
            self.valid: NDArray[np.bool_] | None = None
        else:
            self.valid = _as_1d("valid", valid, n).astype(bool, copy=False)

    def valid_positions(self) -> Positions:
        if self.valid is None:
            return np.arange(self.n, dtype=np.int64)
        return np.flatnonzero(self.valid).astype(np.int64, copy=False)

    def take(self, a: NDArray[Any], pos: Positions) -> NDArray[Any]:
        """``a[pos]``, without a copy when ``pos`` is every position."""
        return a if pos.shape[0] == self.n else a[pos]

    def checked(self, name: str, a: NDArray[Any], pos: Positions) -> NDArray[Any]:
        """Candidate values of a score, refusing NaN (it has no place in a ranking)."""
        v = self.take(a, pos)
        if np.issubdtype(v.dtype, np.floating) and np.isnan(v).any():
            first = int(pos[np.flatnonzero(np.isnan(v))[0]])
            raise ConfigError(
                f"`{name}` is NaN at position {first}, a valid sample: mark such samples invalid "
                "(valid=False) or re-index them"
            )
        return v

    def clusters(self, pos: Positions) -> NDArray[np.integer[Any]]:
        z = self.take(self.cluster_ids, pos)
        if z.size and (int(z.min()) < 0 or int(z.max()) >= self.num_clusters):
            bad = int(z.min()) if int(z.min()) < 0 else int(z.max())
            raise ConfigError(
                f"`cluster_ids` of valid samples must be in [0, {self.num_clusters}) "
                f"(num_clusters), got {bad}: check num_clusters or mark the sample invalid"
            )
        return z


def _stage1(x: _Inputs, entropy_keep: float | None, entropy_threshold: float | None) -> Positions:
    """Stage I: positions of the candidates (sorted)."""
    pos = x.valid_positions()
    if entropy_keep is not None:
        m = min(math.floor(entropy_keep * x.n + 0.5), pos.shape[0])
        return pos[_top_mask(x.checked("entropy", x.entropy, pos), m)]
    if entropy_threshold is not None:
        e = x.take(x.entropy, pos)
        return pos[e >= entropy_threshold]
    return pos


# --- strategies: all take the same inputs and return sorted global positions -------------------


class Strategy(Protocol):
    def __call__(
        self,
        x: _Inputs,
        b: int,
        *,
        entropy_keep: float | None,
        entropy_threshold: float | None,
        seed: int,
    ) -> Positions: ...


def _rsprune(
    x: _Inputs, b: int, *, entropy_keep: float | None, entropy_threshold: float | None, seed: int
) -> Positions:
    pos = _stage1(x, entropy_keep, entropy_threshold)
    if pos.shape[0] <= b:
        return pos
    z = x.clusters(pos)
    s = x.checked("similarity", x.similarity, pos)
    return pos[_stratified(z, s, x.num_clusters, b)]


def _stratified_only(
    x: _Inputs, b: int, *, entropy_keep: float | None, entropy_threshold: float | None, seed: int
) -> Positions:
    return _rsprune(x, b, entropy_keep=None, entropy_threshold=None, seed=seed)


def _entropy_only(
    x: _Inputs, b: int, *, entropy_keep: float | None, entropy_threshold: float | None, seed: int
) -> Positions:
    pos = x.valid_positions()
    return pos[_top_mask(x.checked("entropy", x.entropy, pos), b)]


def _nearest(
    x: _Inputs, b: int, *, entropy_keep: float | None, entropy_threshold: float | None, seed: int
) -> Positions:
    pos = x.valid_positions()
    return pos[_top_mask(x.checked("similarity", x.similarity, pos), b)]


def _random(
    x: _Inputs, b: int, *, entropy_keep: float | None, entropy_threshold: float | None, seed: int
) -> Positions:
    pos = x.valid_positions()
    if pos.shape[0] <= b:
        return pos
    rng = np.random.default_rng(seed)
    return np.sort(pos[rng.choice(pos.shape[0], size=b, replace=False)])


def _moderate(
    x: _Inputs, b: int, *, entropy_keep: float | None, entropy_threshold: float | None, seed: int
) -> Positions:
    """Moderate-DS (Xia et al., ICLR 2023): samples whose distance to their cluster's centroid is
    closest to that cluster's median distance. Distance is ``1 - s``, so ``|d - median(d)| =
    |s - median(s)|`` per cluster, computed in float64."""
    pos = x.valid_positions()
    if pos.shape[0] <= b:
        return pos
    z = x.clusters(pos)
    s = x.checked("similarity", x.similarity, pos).astype(np.float64)
    order, starts = _group_by_cluster(z, np.bincount(z, minlength=x.num_clusters))
    s_grouped = s[order]
    med = np.zeros(x.num_clusters, dtype=np.float64)
    for k in np.flatnonzero(np.diff(starts)).tolist():
        med[k] = np.median(s_grouped[starts[k] : starts[k + 1]])
    score = -np.abs(s - med[z])  # larger = closer to the median
    return pos[_top_mask(score, b)]


STRATEGIES: dict[str, Strategy] = {
    "entropy": _entropy_only,
    "moderate": _moderate,
    "nearest": _nearest,
    "random": _random,
    "rsprune": _rsprune,
    "stratified": _stratified_only,
}
"""Strategy name -> function. ``rsprune`` is the method; the others are the paper's baselines:
``entropy`` (Stage I only: top-B by entropy), ``stratified`` (Stage II only), ``nearest`` (top-B by
centroid similarity, no balancing), ``moderate`` (Moderate-DS), ``random`` (seeded, uniform)."""

#: Strategies whose candidates pass through Stage I (and so through ``max_nodata``).
STAGE1_STRATEGIES = frozenset({"rsprune", "entropy"})


def get_strategy(name: str) -> Strategy:
    """The strategy function registered under ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"`strategy` must be one of {sorted(STRATEGIES)}, got {name!r}") from None


def select_indices(
    entropy: ArrayLike,
    cluster_ids: ArrayLike,
    similarity: ArrayLike,
    *,
    num_clusters: int,
    prune_ratio: float,
    entropy_keep: float | None = None,
    entropy_threshold: float | None = None,
    valid: ArrayLike | None = None,
    strategy: str = "rsprune",
    seed: int = 0,
) -> Positions:
    """Select the samples to keep, exactly as RS-Prune states it (see the module docstring).

    Args:
        entropy: per-sample Stage I entropy in bits (float16/32/64, used as given).
        cluster_ids: per-sample nearest reference cluster in ``[0, num_clusters)`` (int16/32/64).
        similarity: per-sample cosine similarity to that cluster's centroid (float16/32/64).
        num_clusters: K, the number of reference clusters.
        prune_ratio: share to drop, in [0, 1); budget ``B = floor((1 - prune_ratio) * N + 0.5)``.
        entropy_keep: Stage I by fraction of N (exclusive with ``entropy_threshold``).
        entropy_threshold: Stage I by entropy threshold in bits.
        valid: bool mask of usable samples (default: all); invalid samples are never selected.
        strategy: a name in :data:`STRATEGIES`; the baselines ignore the Stage I arguments except
            ``entropy``, which ranks by entropy itself.
        seed: seed of the ``random`` strategy.

    Returns:
        Sorted int64 global positions of the selected samples (at most B).

    Example:
        >>> select_indices([5., 6., 7., 1.], [0, 0, 1, 1], [.9, .8, .7, .95],
        ...                num_clusters=2, prune_ratio=0.5).tolist()
        [0, 3]
    """
    if entropy_keep is not None and entropy_threshold is not None:
        raise ConfigError(
            "`entropy_keep` and `entropy_threshold` are exclusive, got "
            f"{entropy_keep!r} and {entropy_threshold!r}: pass only one"
        )
    ratio = check_number("prune_ratio", prune_ratio, 0.0, 1.0, hi_open=True)
    if entropy_keep is not None:
        check_number("entropy_keep", entropy_keep, 0.0, 1.0, lo_open=True)
    if entropy_threshold is not None:
        check_number("entropy_threshold", entropy_threshold, -math.inf, math.inf)
    check_int("seed", seed, 0)
    fn = get_strategy(strategy)
    x = _Inputs(entropy, cluster_ids, similarity, num_clusters, valid)
    out = fn(
        x,
        budget(x.n, ratio),
        entropy_keep=entropy_keep,
        entropy_threshold=entropy_threshold,
        seed=seed,
    )
    return out.astype(np.int64, copy=False)


__all__ = ["STRATEGIES", "budget", "get_strategy", "select_indices"]
