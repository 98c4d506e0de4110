"""Hand-checked values of the quality benchmark's metric functions (benchmarks/_quality_metrics.py)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_quality_metrics.py"
_spec = importlib.util.spec_from_file_location("_quality_metrics", _PATH)
assert _spec is not None and _spec.loader is not None
qm = importlib.util.module_from_spec(_spec)
sys.modules["_quality_metrics"] = qm
_spec.loader.exec_module(qm)


def _gauss(n: int = 500, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * np.array([1.0, 2.0, 0.5, 3.0])[:d]


def test_frechet_identical_sets_is_zero() -> None:
    x = _gauss()
    assert qm.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_shift_is_squared_shift() -> None:
    x = _gauss()
    shift = np.array([3.0, -4.0, 0.0, 0.0])  # |v|^2 = 25, covariances equal
    assert qm.frechet_distance(x, x + shift) == pytest.approx(25.0, rel=1e-9)


def test_frechet_of_scaled_1d_gaussians() -> None:
    # 1-d: FD = (m1 - m2)^2 + (s1 - s2)^2; x and 3x have std s and 3s, means 0 and 3*mean
    x = np.array([[-1.0], [1.0]])  # mean 0, sample variance 2
    got = qm.frechet_distance(x, 3 * x)
    assert got == pytest.approx((math.sqrt(2) - 3 * math.sqrt(2)) ** 2)  # = 8


def test_frechet_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="same d"):
        qm.frechet_distance(np.zeros((3, 2)), np.zeros((3, 3)))


def test_kcenter_radius_on_a_line() -> None:
    points = np.arange(11, dtype=np.float64)[:, None]  # 0, 1, ..., 10
    assert qm.kcenter_radius(points, np.array([[0.0], [10.0]])) == pytest.approx(5.0)
    assert qm.kcenter_radius(points, np.array([[3.0]])) == pytest.approx(7.0)
    assert qm.kcenter_radius(points, points) == pytest.approx(0.0, abs=1e-3)


def test_nearest_distances_2d_and_chunking() -> None:
    points = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    centers = np.array([[0.0, 0.0]])
    np.testing.assert_allclose(
        qm.nearest_distances(points, centers, chunk=1), [0, 5, 10], atol=1e-5
    )


def test_occupancy_entropy_by_hand() -> None:
    assert qm.occupancy_entropy(np.arange(4), 4) == pytest.approx(1.0)  # uniform
    assert qm.occupancy_entropy(np.zeros(9, int), 4) == pytest.approx(0.0)  # all in one
    assert qm.occupancy_entropy(np.array([0, 1]), 4) == pytest.approx(math.log(2) / math.log(4))
    # p = (1/2, 1/4, 1/4) over k = 8: H = 1.5 bits, log2 8 = 3
    assert qm.occupancy_entropy(np.array([0, 0, 1, 2, -1]), 8) == pytest.approx(0.5)
    assert qm.occupancy_entropy(np.zeros(0, int), 3) == 0.0
    with pytest.raises(ValueError):
        qm.occupancy_entropy(np.zeros(3, int), 1)


def test_cluster_coverage() -> None:
    assert qm.cluster_coverage(np.array([0, 0, 2, -1, 5]), 4) == 2


def test_share_ratio() -> None:
    pool = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # shares 1/4, 1/4, 1/2, class 3 absent
    sel = np.array([0, 2, 2, 2])  # shares 1/4, 0, 3/4
    got = qm.share_ratio(sel, pool, 4)
    np.testing.assert_allclose(got[:3], [1.0, 0.0, 1.5])
    assert np.isnan(got[3])


def test_pca_recovers_the_dominant_axis() -> None:
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=400) * 10, rng.normal(size=400)]
    basis = qm.pca_basis(x, 1)
    np.testing.assert_allclose(np.abs(basis[2][:, 0]), [1.0, 0.0], atol=0.02)
    z = qm.pca_project(x, basis)
    assert z.shape == (400, 1) and abs(float(z.mean())) < 1e-4


def test_colour_texture_features_are_histograms() -> None:
    pytest.importorskip("skimage")
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    f = qm.colour_texture_features(rgb, size=32)
    assert f.shape == (68,) and f.dtype == np.float32
    # 3 colour histograms + 2 LBP histograms, each summing to 1
    assert f.sum() == pytest.approx(5.0, rel=1e-5)
    black = qm.colour_texture_features(np.zeros((32, 32, 3), np.uint8), size=32)
    assert black[0] == black[16] == black[32] == pytest.approx(1.0)  # every pixel in bin 0
