"""Near-duplicate removal: hand-checked cases, properties, the approximate path, the config layer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsprune_data import PruneConfig
from rsprune_data.dedup import duplicate_groups, near_duplicates
from rsprune_data.errors import ConfigError, IndexNotFoundError
from rsprune_data.index import PruneIndex


def unit(*rows: list[float]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_chain_keeps_the_far_end_because_only_kept_samples_count():
    # A~B and B~C above tau, A~C below: B duplicates A; C is compared only with kept A -> kept
    a, b, c = unit([1, 0], [np.cos(0.2), np.sin(0.2)], [np.cos(0.4), np.sin(0.4)])
    tau = float(np.cos(0.3))
    assert cos(a, b) >= tau and cos(b, c) >= tau and cos(a, c) < tau
    dup = near_duplicates(np.stack([c, a, b]), np.zeros(3, int), np.array([0.5, 0.9, 0.7]), tau)
    assert dup.tolist() == [-1, -1, 1]  # position 2 (b) duplicates position 1 (a, most central)


def test_the_most_central_kept_sample_is_the_representative_and_ties_go_to_lower_position():
    e = unit([1, 0, 0], [1, 0, 0], [1, 0.001, 0], [0, 1, 0])
    # equal centrality of 0 and 1: position 0 is visited first and kept
    dup = near_duplicates(e, np.zeros(4, int), np.array([0.8, 0.8, 0.9, 0.1]), 0.99)
    assert dup.tolist() == [2, 2, -1, -1]


def test_clusters_invalid_and_unclustered_samples_are_separate():
    e = unit([1, 0], [1, 0], [1, 0], [1, 0], [1, 0])
    dup = near_duplicates(
        e,
        np.array([0, 1, 0, -1, 0]),
        np.array([0.9, 0.9, 0.8, 0.9, 0.7]),
        0.95,
        valid=np.array([True, True, True, True, False]),
    )
    assert dup.tolist() == [-1, -1, 0, -1, -1]
    assert duplicate_groups(dup) == [(0, [2])]


def test_bad_tau_is_refused_with_the_name():
    e = unit([1, 0])
    for tau in (0.0, 1.5, True):
        with pytest.raises(ConfigError, match="dedup_threshold"):
            near_duplicates(e, np.zeros(1, int), np.ones(1), tau)
    with pytest.raises(ConfigError, match="dedup_threshold"):
        PruneConfig(prune_ratio=0.5, dedup_threshold=1.2)


def test_tau_one_finds_every_exact_copy():
    """tau = 1: identical rows are duplicates although float32 may put their cosine just below 1."""
    rng = np.random.default_rng(3)
    x = unit(*rng.standard_normal((400, 1280)).tolist())
    x16 = np.concatenate([x, x[:50]]).astype(np.float16)  # 50 exact copies, as a sidecar stores
    z = np.zeros(450, int)
    sim = np.concatenate([np.linspace(0.9, 0.1, 400), np.full(50, 0.05)])
    dup = near_duplicates(x16, z, sim, 1.0)
    assert dup[400:].tolist() == list(range(50)) and (dup[:400] < 0).all()


def planted_pool(n: int, d: int, k: int, copies: int, seed: int, spread: float = 0.3):
    """Clusters of random unit rows plus ``copies`` near copies (cosine > 0.99) of random rows."""
    rng = np.random.default_rng(seed)
    centers = unit(*rng.standard_normal((k, d)).tolist())
    z = rng.integers(0, k, n)
    x = centers[z] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    src = rng.choice(n - copies, copies, replace=False)
    x[n - copies :] = x[src] + 0.002 * rng.standard_normal((copies, d))
    z[n - copies :] = z[src]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = np.einsum("nd,nd->n", x, centers[z])
    return x.astype(np.float32), z, sim, src


def check_rule(x, z, sim, tau, dup, valid=None):
    """Kept samples of a cluster are never >= tau apart; each duplicate points at a kept, more
    central sample of its cluster at cosine >= tau."""
    ok = np.ones(len(z), bool) if valid is None else valid
    for c in np.unique(z[ok]):
        kept = np.flatnonzero(ok & (z == c) & (dup < 0))
        s = x[kept] @ x[kept].T
        np.fill_diagonal(s, -1)
        assert (s < tau + 1e-6).all()
    for j in np.flatnonzero(dup >= 0):
        i = dup[j]
        assert dup[i] < 0 and z[i] == z[j] and ok[i]
        assert (sim[i], -i) > (sim[j], -j)
        assert cos(x[i], x[j]) >= tau - 1e-6


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 60),
    k=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    tau=st.sampled_from([0.5, 0.8, 0.95, 0.99]),
)
def test_property_rule_determinism_and_shard_order(n, k, seed, tau):
    copies = n // 3
    x, z, sim, _ = planted_pool(n, 8, k, copies, seed, spread=1.0)
    dup = near_duplicates(x, z, sim, tau)
    check_rule(x, z, sim, tau, dup)
    np.testing.assert_array_equal(dup, near_duplicates(x, z, sim, tau))
    # another shard order: the same samples, the same decisions (similarities are distinct here)
    rng = np.random.default_rng(seed)
    bounds = np.sort(rng.choice(np.arange(1, n), min(2, n - 1), replace=False))
    blocks = np.split(np.arange(n), bounds)
    perm = np.concatenate(blocks[::-1])
    where = np.empty(n, np.int64)
    where[perm] = np.arange(n)
    dup_p = near_duplicates(x[perm], z[perm], sim[perm], tau)
    back = np.where(dup_p >= 0, perm[np.maximum(dup_p, 0)], -1)[where]
    np.testing.assert_array_equal(back, dup)


def test_approximate_lists_find_planted_copies_and_obey_the_rule():
    x, z, sim, _src = planted_pool(3000, 32, 2, 300, seed=1, spread=1.0)
    exact = near_duplicates(x, z, sim, 0.95, exact_max=None)
    approx = near_duplicates(x, z, sim, 0.95, exact_max=64, list_size=64, nprobe=2, proj_dims=16)
    check_rule(x, z, sim, 0.95, exact)
    # every reported duplicate is real; recall of the exact duplicates is high
    for j in np.flatnonzero(approx >= 0):
        assert approx[approx[j]] < 0 and cos(x[j], x[approx[j]]) >= 0.95 - 1e-6
    found = ((approx >= 0) & (exact >= 0)).sum() / max(1, (exact >= 0).sum())
    assert 300 <= (exact >= 0).sum() <= 330 and found >= 0.98


def test_dedup_threshold_removes_planted_copies_before_stage2():
    x, z, sim, src = planted_pool(400, 16, 4, 40, seed=3)
    rng = np.random.default_rng(0)
    entropy = rng.uniform(5, 7, 400)
    index = PruneIndex.from_arrays(entropy, z, sim, num_clusters=4).attach_embeddings(x)
    plain = PruneConfig(prune_ratio=0.0, entropy_filter="none", max_nodata=None)
    dedup = plain.replace(dedup_threshold=0.98)
    assert index.select(plain).size == 400
    kept = index.select(dedup)
    copies = np.arange(360, 400)
    # of every planted pair at most one survives; the summary counts what was removed
    pairs = [(int(a), int(b)) for a, b in zip(src, copies, strict=True)]
    assert all(not (a in kept and b in kept) for a, b in pairs)
    summary = index.summary(dedup, kept)
    assert summary["duplicates_dropped"] == 400 - kept.size >= 40
    assert summary["candidates"] == kept.size and summary["dedup_threshold"] == 0.98
    # at a ratio the budget still counts all samples; no duplicate is selected
    cfg = dedup.replace(prune_ratio=0.5)
    sel = index.select(cfg)
    assert sel.size == 200 and not (index.duplicate_of(0.98)[sel] >= 0).any()
    with pytest.raises(IndexNotFoundError, match="attach_embeddings"):
        PruneIndex.from_arrays(entropy, z, sim, num_clusters=4).select(cfg)
