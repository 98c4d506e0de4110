"""Stage I information measure: Shannon entropy of an image's 8-bit luma histogram.

RS-Prune (Wei, Dong et al.) Stage I scores each image by its global entropy

    H(I) = -sum_{k=0}^{L-1} p_k log2 p_k,   L = 256,

where p_k is the share of pixels at grey level k and 0 log 0 = 0. Colour images are reduced to luma
with ITU-R 601 weights, L = 0.299 R + 0.587 G + 0.114 B, computed in the same fixed-point arithmetic
as PIL's ``Image.convert("L")`` so the two agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

LEVELS = 256


def entropy_from_hist(
    hist: NDArray[np.integer[Any]] | NDArray[np.floating[Any]],
) -> NDArray[np.float64]:
    """Entropy in bits of histogram(s) over the last axis.

    Args:
        hist: counts, shape ``[..., L]``; rows summing to 0 get entropy 0.

    Returns:
        float64 array of shape ``hist.shape[:-1]`` (a 0-d array for one histogram).

    Example:
        >>> float(entropy_from_hist(np.array([1, 1, 1, 1])))
        2.0
    """
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim == 1:  # the per-image hot path: only the non-empty bins
        total1 = h.sum()
        p1 = h[h > 0] / total1 if total1 > 0 else h[:0]
        return np.asarray(-(p1 * np.log2(p1)).sum() + 0.0)
    total = h.sum(axis=-1, keepdims=True)
    p = np.divide(h, total, out=np.zeros_like(h), where=total > 0)
    logp = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return np.asarray(-(p * logp).sum(axis=-1) + 0.0)


def gray_hist(gray: NDArray[np.uint8]) -> NDArray[np.int64]:
    """256-bin histogram of an 8-bit grey image."""
    return np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=LEVELS)


def gray_entropy(gray: NDArray[np.uint8]) -> float:
    """Entropy in bits of an 8-bit grey image (see the module docstring)."""
    return float(entropy_from_hist(gray_hist(gray)))


def luma_u8(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """ITU-R 601 luma of an ``HxWx3`` uint8 image, exactly as PIL's ``convert("L")``.

    PIL computes ``(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`` (weights 0.299/0.587/0.114 in 16-bit
    fixed point, rounded); we do the same so entropy agrees with a PIL computation exactly.
    """
    a = np.asarray(rgb)
    r = a[..., 0].astype(np.uint32)
    g = a[..., 1].astype(np.uint32)
    b = a[..., 2].astype(np.uint32)
    luma: NDArray[np.uint8] = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    return luma
