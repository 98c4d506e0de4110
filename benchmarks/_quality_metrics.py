"""Metric functions of the quality benchmark (``benchmarks/quality.py``): numpy only, no I/O.

Every function takes arrays and returns numbers or arrays, so each can be checked by hand on tiny
inputs (``tests/test_quality_metrics.py``). The hand-crafted features need scikit-image and Pillow,
imported inside :func:`colour_texture_features`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating[Any]]


# --- projections ---------------------------------------------------------------------------------


def pca_basis(
    x: FloatArray, dims: int, *, standardize: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Mean, scale and the top ``dims`` principal axes of ``x`` ``[n, d]``.

    ``standardize`` divides every feature by its standard deviation first (for hand-crafted
    features whose columns have unrelated units); otherwise the scale is 1. Project with
    :func:`pca_project`. Axes come from the eigenvectors of the ``d x d`` covariance, so ``n`` may
    be large; their signs are fixed (largest entry positive) so the result is deterministic.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"`x` must be [n >= 2, d], got shape {x.shape}")
    dims = min(int(dims), x.shape[1])
    mean = x.mean(axis=0)
    scale = x.std(axis=0) if standardize else np.ones(x.shape[1])
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    cov = z.T @ z / (x.shape[0] - 1)
    vals, vecs = np.linalg.eigh(cov)
    axes = vecs[:, np.argsort(vals)[::-1][:dims]]
    flip = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dims)])
    return mean, scale, axes * flip


def pca_project(x: FloatArray, basis: tuple[NDArray[np.float64], ...]) -> NDArray[np.float32]:
    """``x`` in the coordinates of a :func:`pca_basis` (float32 ``[n, dims]``)."""
    mean, scale, axes = basis
    return ((np.asarray(x, dtype=np.float64) - mean) / scale @ axes).astype(np.float32)


# --- representativeness ----------------------------------------------------------------------------


def _psd_sqrt(c: NDArray[np.float64]) -> NDArray[np.float64]:
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(a: FloatArray, b: FloatArray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b`` (as FID)::

        |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)

    The trace term uses the symmetric form (equal to ``tr((C_a C_b)^1/2)``) and eigenvalues clipped
    at zero, so it stays real and stable for rank-deficient covariances. Two equal sets give 0;
    two sets that differ by a shift ``v`` give ``|v|^2``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"`a` and `b` must be [n >= 2, d] with the same d, got {a.shape} and {b.shape}"
        )
    d = a.shape[1]
    ca = np.asarray(np.cov(a, rowvar=False), dtype=np.float64).reshape(d, d)
    cb = np.asarray(np.cov(b, rowvar=False), dtype=np.float64).reshape(d, d)
    sa = _psd_sqrt(ca)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cb @ sa), 0.0, None)).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(max(diff @ diff + np.trace(ca) + np.trace(cb) - 2.0 * cross, 0.0))


def nearest_distances(
    points: FloatArray, centers: FloatArray, *, chunk: int = 4096
) -> NDArray[np.float32]:
    """Euclidean distance from every row of ``points`` to its nearest row of ``centers``.

    Chunked matrix products (``|p|^2 + |c|^2 - 2 p.c``, clipped at 0), so memory stays at
    ``chunk x len(centers)``.
    """
    p = np.asarray(points, dtype=np.float32)
    c = np.asarray(centers, dtype=np.float32)
    if c.shape[0] == 0:
        raise ValueError("`centers` is empty: a cover radius needs at least one center")
    cn = (c * c).sum(axis=1)
    ct = np.ascontiguousarray(c.T)
    out = np.empty(p.shape[0], np.float32)
    for lo in range(0, p.shape[0], chunk):
        q = p[lo : lo + chunk]
        d2 = (q * q).sum(axis=1)[:, None] + cn[None, :] - 2.0 * (q @ ct)
        out[lo : lo + chunk] = np.sqrt(np.clip(d2.min(axis=1), 0.0, None))
    return out


def kcenter_radius(points: FloatArray, centers: FloatArray) -> float:
    """k-center cover radius: how far the worst-covered point is from its nearest center."""
    return float(nearest_distances(points, centers).max(initial=0.0))


# --- coverage and balance ----------------------------------------------------------------------


def cluster_coverage(labels: NDArray[np.integer], k: int) -> int:
    """How many of the clusters ``0 .. k-1`` hold at least one of ``labels`` (negatives ignored)."""
    lab = np.asarray(labels).astype(np.int64)
    lab = lab[(lab >= 0) & (lab < k)]
    return int(np.count_nonzero(np.bincount(lab, minlength=k)))


def occupancy_entropy(labels: NDArray[np.integer], k: int) -> float:
    """Shannon entropy of the label occupancy over ``k`` bins divided by ``log k``.

    1 = every bin equally full, 0 = one bin holds everything. Negative labels are ignored; an
    empty selection gives 0.
    """
    if k < 2:
        raise ValueError(f"`k` must be >= 2 for a normalised entropy, got {k}")
    lab = np.asarray(labels).astype(np.int64)
    counts = np.bincount(lab[(lab >= 0) & (lab < k)], minlength=k).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(k))


def share_ratio(
    selected: NDArray[np.integer], pool: NDArray[np.integer], k: int
) -> NDArray[np.float64]:
    """Per class: its share of the selection divided by its share of the pool.

    1 = the class kept its share, 0 = it was dropped, NaN = absent from the pool. Negative labels
    (for example samples that are not in any of the classes counted) are ignored.
    """

    def shares(lab: NDArray[np.integer]) -> NDArray[np.float64]:
        lab = np.asarray(lab).astype(np.int64)
        counts = np.bincount(lab[(lab >= 0) & (lab < k)], minlength=k).astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    pool_share = shares(pool)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pool_share > 0, shares(selected) / pool_share, np.nan)


# --- hand-crafted features (a space the selection never used) ------------------------------------

FEATURE_SIZE = 128
COLOUR_BINS = 16
LBP_POINTS = 8


def colour_texture_features(
    rgb: NDArray[np.uint8], *, size: int = FEATURE_SIZE
) -> NDArray[np.float32]:
    """Colour and texture histograms of one ``HxWx3`` uint8 tile: a 68-d float32 vector.

    The tile is resized to ``size x size`` (so 256-px UC Merced and 128-px Harvey tiles are seen at
    one scale), then: 16-bin histograms of R, G and B (48), and uniform LBP histograms (scikit-image,
    8 neighbours, radius 1; 10 bins each) of the luma at ``size`` and at ``size / 2`` (20). Every
    histogram sums to 1.
    """
    from PIL import Image
    from skimage.feature import local_binary_pattern

    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    parts = [
        np.bincount(arr[..., ch].ravel() // (256 // COLOUR_BINS), minlength=COLOUR_BINS)
        for ch in range(3)
    ]
    gray = img.convert("L")
    for scale in (size, size // 2):
        g = np.asarray(
            gray if scale == size else gray.resize((scale, scale), Image.Resampling.BILINEAR)
        )
        lbp = local_binary_pattern(g, LBP_POINTS, 1, "uniform").astype(np.int64)
        parts.append(np.bincount(lbp.ravel(), minlength=LBP_POINTS + 2))
    return np.concatenate([p / max(p.sum(), 1) for p in parts]).astype(np.float32)
