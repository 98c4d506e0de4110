"""Near-duplicate removal within reference clusters, SemDeDup-style (arrays in, a column out).

The rule (Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication", 2023, applied within the RS-Prune reference clusters): inside each cluster, visit the
samples in descending centrality (similarity to the centroid, ties by lower global position); a
sample whose cosine to an already *kept* sample is ``>= tau`` is a duplicate of the first (most
central) such kept sample, otherwise it is kept. The result is the column ``dup_of``: ``-1`` for kept
samples (and for invalid or unclustered ones), else the global position of the kept sample it
duplicates. The config layer (``PruneConfig(dedup_threshold=tau)``, :mod:`rsprune_data.plan`) turns it
into eligibility before Stage II; :func:`rsprune_data.selection.select_indices` is untouched.

Cost. All pairs of a cluster of ``m`` samples cost ``m^2 d``; with K fixed, ``m`` grows with N, so an
exact pass is quadratic in N. Clusters of at most ``exact_max`` samples are still compared all
against all (exact). A larger cluster is split into candidate lists: its unit rows are projected
to ``proj_dims`` dimensions (a fixed seeded orthonormal random projection), spherical k-means (faiss)
forms ``ceil(m / list_size)`` sub-clusters, and each sample joins the lists of its ``nprobe`` nearest
sub-centroids. Only pairs that share a list are compared, exactly, in full dimension, so each
sample meets ``~nprobe * list_size`` candidates and the work is linear in N (plus the sub-clustering,
``m^2 proj_dims / list_size`` per cluster, small up to ~10^7 samples with K = 200).

The approximation: a pair above ``tau`` whose members never share a list is missed, so a duplicate
may be kept (never the reverse: every reported duplicate really is ``>= tau`` from a kept sample).
Measured recall against the exact pass (``benchmarks/dedup_scaling.py``, d = 128, K = 200, 10%
planted near copies at cosine 0.95-0.9999, ``tau = 0.95``): 1.0000 at 100k samples, 0.9993 at 300k
(21 of 30,000 duplicates kept). Time 100k -> 1M: 5.2x in a run at load 6-7, 17x in one at load 14-15
on the shared 2-core machine.

Determinism: cluster members are processed in centrality order, so the result depends on the
order of shards only through ties in similarity (equal similarity: lower global position first);
faiss k-means is seeded. Pure numpy + faiss: no torch, no I/O, no printing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

DEFAULT_LIST_SIZE = 128
DEFAULT_NPROBE = 2
DEFAULT_PROJ_DIMS = 32
_ROW_BLOCK = 2048


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Single-threaded BLAS for the many small products of this module, when threadpoolctl is
    installed. Their matrices are a few hundred rows: a BLAS thread team costs more than it saves
    (measured 5x slower with two OpenBLAS threads on a loaded 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[Any] = threadpool_limits(limits=1, user_api="blas")
    return limits


#: Cosines this close below ``tau`` count as reaching it: the float32 rounding of the product
#: (a unit row times itself came out at most 7.2e-7 below 1 at d = 96-1280).
COS_ROUNDING = 1e-6


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 < float(tau) <= 1.0:
        raise ConfigError(f"`dedup_threshold` (tau) must be a cosine in (0, 1], got {tau!r}")
    return float(tau)


def centrality_order(members: NDArray[np.int64], similarity: NDArray[Any]) -> NDArray[np.int64]:
    """``members`` sorted by descending similarity, ties by lower position."""
    order: NDArray[np.int64] = members[
        np.lexsort((members, -np.asarray(similarity, np.float64)[members]))
    ]
    return order


def _pairs_in_block(
    x: NDArray[np.float32], ids: NDArray[np.int64], tau: float
) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """Pairs ``(ids[a], ids[b])``, ``ids[a] < ids[b]``, of rows of ``x`` with cosine >= tau
    (up to :data:`COS_ROUNDING`: two identical unit rows may multiply to slightly less than 1 in
    float32, and ``tau = 1`` must still find exact copies)."""
    for lo in range(0, x.shape[0], _ROW_BLOCK):
        s = x[lo : lo + _ROW_BLOCK] @ x.T
        a, b = np.nonzero(s >= tau - COS_ROUNDING)
        ia, ib = ids[a + lo], ids[b]
        keep = ia < ib
        yield ia[keep], ib[keep]


def _projection(d: int, p: int, seed: int) -> NDArray[np.float32]:
    g = np.random.default_rng([seed, d, p]).standard_normal((d, p))
    q, _ = np.linalg.qr(g)
    return np.ascontiguousarray(q, np.float32)


def _candidate_lists(
    x: NDArray[np.float32], list_size: int, nprobe: int, proj: NDArray[np.float32], seed: int
) -> list[NDArray[np.int64]]:
    """Sub-cluster lists (row numbers, ascending) of the unit rows ``x``; see the module docstring."""
    import faiss

    m = x.shape[0]
    y = np.ascontiguousarray(x @ proj)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    nlist = max(1, math.ceil(m / list_size))
    km = faiss.Kmeans(
        y.shape[1],
        nlist,
        niter=10,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(64, list_size),
    )
    # one OpenMP thread: these k-means are tiny (m rows, proj_dims columns), and faiss's thread
    # team costs more than it saves on them (measured 4x slower with 2 threads on a busy machine)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km.train(y)
        flat = faiss.IndexFlatIP(y.shape[1])
        flat.add(np.ascontiguousarray(km.centroids, np.float32))
        _, near = flat.search(y, min(nprobe, nlist))
    finally:
        faiss.omp_set_num_threads(threads)
    rows = np.repeat(np.arange(m, dtype=np.int64), near.shape[1])
    lists = near.reshape(-1).astype(np.int64)
    order = np.lexsort((rows, lists))
    rows, lists = rows[order], lists[order]
    cuts = np.flatnonzero(np.diff(lists)) + 1
    return [r for r in np.split(rows, cuts) if r.size > 1]


def _greedy(m: int, a: NDArray[np.int64], b: NDArray[np.int64]) -> NDArray[np.int64]:
    """Rank-local ``dup_of`` from edges ``a < b`` (ranks in centrality order)."""
    dup = np.full(m, -1, np.int64)
    if a.size == 0:
        return dup
    order = np.lexsort((a, b))
    a, b = a[order], b[order]
    kept = np.ones(m, bool)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    ends = np.r_[starts[1:], b.size]
    for j, lo, hi in zip(b[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
        cand = a[lo:hi]  # ascending: the most central first
        k = cand[kept[cand]]
        if k.size:
            kept[j] = False
            dup[j] = k[0]
    return dup


def near_duplicates(
    emb: NDArray[Any],
    cluster_ids: NDArray[Any],
    similarity: NDArray[Any],
    tau: float,
    *,
    valid: NDArray[Any] | None = None,
    exact_max: int | None = DEFAULT_LIST_SIZE * DEFAULT_NPROBE,
    list_size: int = DEFAULT_LIST_SIZE,
    nprobe: int = DEFAULT_NPROBE,
    proj_dims: int = DEFAULT_PROJ_DIMS,
    seed: int = 0,
) -> NDArray[np.int64]:
    """The ``dup_of`` column of the pool (see the module docstring for the rule and its cost).

    Args:
        emb: ``[n, d]`` embeddings in global position order (float16/32; rows renormalised here).
        cluster_ids: ``[n]`` reference cluster per sample (``-1`` = none: never a duplicate).
        similarity: ``[n]`` cosine to the sample's centroid (the centrality).
        tau: cosine threshold in (0, 1].
        valid: ``[n]`` bool; invalid samples are neither duplicates nor representatives.
        exact_max: clusters up to this size are compared all against all; ``None`` = always
            (the O(m^2) reference pass).
        list_size, nprobe, proj_dims, seed: the candidate lists of larger clusters.

    Returns:
        int64 ``[n]``: ``-1`` for kept samples, else the position of the kept sample duplicated.

    Example:
        >>> e = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
        >>> near_duplicates(e, np.array([0, 0, 0]), np.array([0.9, 0.8, 0.7]), 0.99).tolist()
        [-1, 0, -1]
    """
    tau = _check_tau(tau)
    x_all = np.asarray(emb)
    z = np.asarray(cluster_ids).astype(np.int64, copy=False)
    n = z.shape[0]
    if x_all.ndim != 2 or x_all.shape[0] != n or np.asarray(similarity).shape != (n,):
        raise ConfigError(
            f"near_duplicates: emb {x_all.shape}, cluster_ids ({n},) and similarity "
            f"{np.asarray(similarity).shape} must describe the same n samples"
        )
    for name, v, lo in (
        ("list_size", list_size, 2),
        ("nprobe", nprobe, 1),
        ("proj_dims", proj_dims, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"`{name}` must be an int >= {lo}, got {v!r}")
    ok = np.ones(n, bool) if valid is None else np.asarray(valid).astype(bool)
    ok &= z >= 0
    out = np.full(n, -1, np.int64)
    pos = np.flatnonzero(ok)
    if pos.size == 0:
        return out
    # members of every cluster, each in centrality order
    sim64 = np.asarray(similarity, np.float64)
    order = pos[np.lexsort((pos, -sim64[pos], z[pos]))]
    zs = z[order]
    cuts = np.flatnonzero(np.diff(zs)) + 1
    with _one_blas_thread():
        _all_clusters(
            x_all, np.split(order, cuts), out, tau, exact_max, list_size, nprobe, proj_dims, seed
        )
    return out


def _all_clusters(
    x_all: NDArray[Any],
    clusters: list[NDArray[np.int64]],
    out: NDArray[np.int64],
    tau: float,
    exact_max: int | None,
    list_size: int,
    nprobe: int,
    proj_dims: int,
    seed: int,
) -> None:
    proj: NDArray[np.float32] | None = None
    for members in clusters:
        m = members.size
        if m < 2:
            continue
        x = np.asarray(x_all[members], np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        ranks = np.arange(m, dtype=np.int64)
        parts: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []
        if exact_max is None or m <= exact_max:
            parts += list(_pairs_in_block(x, ranks, tau))
        else:
            if proj is None:
                proj = _projection(x.shape[1], min(proj_dims, x.shape[1]), seed)
            for rows in _candidate_lists(x, list_size, nprobe, proj, seed):
                parts += list(_pairs_in_block(x[rows], rows, tau))
        if not parts:
            continue
        a = np.concatenate([p[0] for p in parts])
        b = np.concatenate([p[1] for p in parts])
        if exact_max is not None and m > exact_max:  # a pair may share several lists
            ab = np.unique(a * m + b)
            a, b = ab // m, ab % m
        dup = _greedy(m, a, b)
        hit = dup >= 0
        out[members[hit]] = members[dup[hit]]


def duplicate_groups(dup_of: NDArray[np.int64]) -> list[tuple[int, list[int]]]:
    """``[(kept position, [its duplicates]), ...]``, largest groups first (ties by position).

    Example:
        >>> duplicate_groups(np.array([-1, 0, -1, 0, 2]))
        [(0, [1, 3]), (2, [4])]
    """
    d = np.asarray(dup_of, np.int64)
    dups = np.flatnonzero(d >= 0)
    if dups.size == 0:
        return []
    heads = d[dups]
    order = np.lexsort((dups, heads))
    heads, dups = heads[order], dups[order]
    cuts = np.flatnonzero(np.diff(heads)) + 1
    groups = [
        (int(h[0]), g.tolist())
        for h, g in zip(np.split(heads, cuts), np.split(dups, cuts), strict=True)
    ]
    groups.sort(key=lambda t: (-len(t[1]), t[0]))
    return groups


__all__ = ["centrality_order", "duplicate_groups", "near_duplicates"]
