"""The selection core: hand-checked cases for each rule, and hypothesis properties against an
independent naive implementation (tests/reference_selection.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_selection import reference_moderate, reference_select

from rsprune_data import select_indices
from rsprune_data.errors import ConfigError
from rsprune_data.selection import STRATEGIES, budget


def sel(e, z, s, **kw):
    kw.setdefault("num_clusters", int(max(z) + 1) if len(z) else 1)
    return select_indices(
        np.asarray(e, float), np.asarray(z, np.int64), np.asarray(s, float), **kw
    ).tolist()


# --- hand-checked cases ------------------------------------------------------------------------


def test_budget_rounds_half_up():
    assert budget(10, 0.85) == 2  # 1.5 -> 2
    assert budget(10, 0.75) == 3  # 2.5 -> 3
    assert budget(7, 0.5) == 4  # 3.5 -> 4
    assert budget(1000, 0.85) == 150
    assert budget(0, 0.5) == 0


def test_quota_then_global_fill():
    # K=2, N=8, ratio 0.5 -> B=4, q=2. Cluster 0 holds the 5 most similar samples.
    z = [0, 0, 0, 0, 0, 1, 1, 1]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert sel([5] * 8, z, s, prune_ratio=0.5) == [0, 1, 5, 6]  # 2 per cluster, not top-4 overall


def test_rare_cluster_gives_all_and_leftover_goes_to_best_remaining():
    # K=3, B=6, q=2; cluster 2 has one candidate -> 5 taken by quota, 1 from the remainder.
    z = [0, 0, 0, 0, 1, 1, 1, 1, 2]
    s = [0.9, 0.85, 0.5, 0.4, 0.7, 0.6, 0.55, 0.1, 0.3]
    # quota: {0,1} {4,5} {8}; remainder by s: 6 (0.55) beats 2 (0.5)
    assert sel([5] * 9, z, s, prune_ratio=1 / 3) == [0, 1, 4, 5, 6, 8]


def test_budget_not_divisible_by_k():
    # N=10, ratio 0.5 -> B=5, K=3 -> q=1; leftover 2 by global similarity.
    z = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    s = [0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.15, 0.25, 0.05, 0.6]
    # quota: 2 (0.3), 3 (0.9), 9 (0.6); leftover: 4 (0.8), 5 (0.7)
    assert sel([1] * 10, z, s, prune_ratio=0.5) == [2, 3, 4, 5, 9]


def test_ties_go_to_the_lower_position():
    z = [0, 0, 0, 0]
    s = [0.5, 0.5, 0.5, 0.5]
    assert sel([1] * 4, z, s, prune_ratio=0.5) == [0, 1]
    # ties in the leftover fill, across clusters
    z = [0, 1, 0, 1, 0, 1]
    s = [0.9, 0.9, 0.4, 0.4, 0.4, 0.4]
    # B=4, q=2 per cluster: each cluster takes its top and the lower-position of its ties
    assert sel([1] * 6, z, s, prune_ratio=1 / 3) == [0, 1, 2, 3]


def test_entropy_keep_ties_and_fraction_of_all_samples():
    e = [3.0, 5.0, 5.0, 5.0, 1.0, 7.0]
    z = [0] * 6
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # entropy_keep 0.5 of N=6 -> m=3: 5 (7.0), then the two lower positions of the 5.0 tie: 1, 2
    assert sel(e, z, s, prune_ratio=0.0, entropy_keep=0.5) == [1, 2, 5]
    # m counts N but is capped by the valid samples
    valid = [True, False, False, False, True, True]
    assert sel(e, z, s, prune_ratio=0.0, entropy_keep=0.9, valid=valid) == [0, 4, 5]


def test_threshold_versus_fraction():
    e = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    z = [0, 1, 0, 1, 0, 1]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert sel(e, z, s, prune_ratio=0.0, entropy_threshold=4.0) == [3, 4, 5]
    assert sel(e, z, s, prune_ratio=0.0, entropy_keep=0.5) == [3, 4, 5]
    # threshold is inclusive
    assert sel(e, z, s, prune_ratio=0.0, entropy_threshold=6.0) == [5]
    # Stage I then Stage II: B = 2 from candidates {2,3,4,5} -> q=1 per cluster
    assert sel(e, z, s, prune_ratio=2 / 3, entropy_threshold=3.0) == [2, 3]


def test_fewer_candidates_than_budget_returns_all_candidates():
    e = [0.5, 6.0, 0.2, 7.0]
    assert sel(e, [0, 1, 0, 1], [0.1] * 4, prune_ratio=0.0, entropy_threshold=5.0) == [1, 3]


def test_invalid_never_selected_and_all_invalid_is_empty():
    e, z, s = [5.0] * 4, [0, 0, 1, 1], [0.9, 0.1, 0.9, 0.1]
    assert sel(e, z, s, prune_ratio=0.0, valid=[False, True, False, True]) == [1, 3]
    out = select_indices(
        np.array(e),
        np.array(z),
        np.array(s),
        num_clusters=2,
        prune_ratio=0.0,
        valid=np.zeros(4, bool),
    )
    assert out.dtype == np.int64 and out.size == 0


def test_ratio_zero_keeps_every_valid_sample():
    assert sel([1, 2, 3], [0, 1, 2], [0.3, 0.2, 0.1], prune_ratio=0.0) == [0, 1, 2]


def test_empty_input():
    out = select_indices(
        np.array([]), np.array([], np.int16), np.array([]), num_clusters=3, prune_ratio=0.5
    )
    assert out.tolist() == []
    assert select_indices([], [], [], num_clusters=3, prune_ratio=0.5).tolist() == []  # lists


def test_invalid_samples_may_carry_garbage():
    # cluster id -1 and NaN similarity on an invalid sample are fine: it is never a candidate
    out = select_indices(
        np.array([5.0, 5.0]),
        np.array([-1, 0]),
        np.array([np.nan, 0.5]),
        num_clusters=1,
        prune_ratio=0.0,
        valid=np.array([False, True]),
    )
    assert out.tolist() == [1]


@pytest.mark.parametrize(
    "dtype_f,dtype_i", [(np.float16, np.int16), (np.float32, np.int32), (np.float64, np.int64)]
)
def test_natural_dtypes_agree(dtype_f, dtype_i):
    rng = np.random.default_rng(3)
    e = rng.integers(0, 8, 500).astype(dtype_f)
    z = rng.integers(0, 7, 500).astype(dtype_i)
    s = (rng.integers(0, 100, 500) / 100).astype(dtype_f)
    got = select_indices(e, z, s, num_clusters=7, prune_ratio=0.8, entropy_keep=0.6)
    want = reference_select(e, z, s, num_clusters=7, prune_ratio=0.8, entropy_keep=0.6)
    assert got.tolist() == want


def test_bad_arguments_name_the_argument_value_and_range():
    e, z, s = np.ones(3), np.zeros(3, np.int64), np.ones(3)
    with pytest.raises(ConfigError, match=r"`prune_ratio` must be in \[0, 1\), got 1.2"):
        select_indices(e, z, s, num_clusters=1, prune_ratio=1.2)
    with pytest.raises(ConfigError, match="exclusive"):
        select_indices(
            e, z, s, num_clusters=1, prune_ratio=0.5, entropy_keep=0.5, entropy_threshold=3.0
        )
    with pytest.raises(ConfigError, match=r"`cluster_ids` of valid samples must be in \[0, 1\)"):
        select_indices(e, np.array([0, 0, 5]), s, num_clusters=1, prune_ratio=0.5)
    with pytest.raises(ConfigError, match="`similarity` must have 3 entries"):
        select_indices(e, z, np.ones(4), num_clusters=1, prune_ratio=0.5)
    with pytest.raises(ConfigError, match="`similarity` is NaN at position 1"):
        select_indices(e, z, np.array([0.1, np.nan, 0.2]), num_clusters=1, prune_ratio=0.5)
    with pytest.raises(ConfigError, match=r"`strategy` must be one of \['entropy'"):
        select_indices(e, z, s, num_clusters=1, prune_ratio=0.5, strategy="nope")
    with pytest.raises(ConfigError, match="`num_clusters` must be an integer >= 1, got 0"):
        select_indices(e, z, s, num_clusters=0, prune_ratio=0.5)
    with pytest.raises(ConfigError, match="`seed` must be an integer >= 0, got -1"):
        select_indices(e, z, s, num_clusters=1, prune_ratio=0.5, strategy="random", seed=-1)


# --- baselines -----------------------------------------------------------------------------------


def test_baselines_hand_checked():
    e = [1.0, 7.0, 3.0, 6.0, 2.0, 5.0]
    z = [0, 0, 0, 1, 1, 1]
    s = [0.9, 0.1, 0.5, 0.95, 0.3, 0.6]
    assert sel(e, z, s, prune_ratio=0.5, strategy="entropy") == [1, 3, 5]
    assert sel(e, z, s, prune_ratio=0.5, strategy="nearest") == [0, 3, 5]
    # stratified ignores Stage I arguments
    assert sel(e, z, s, prune_ratio=0.5, strategy="stratified", entropy_threshold=6.5) == sel(
        e, z, s, prune_ratio=0.5
    )
    # moderate: medians 0.5 (cluster 0) and 0.6 (cluster 1) -> scores 0.4,0.4,0,0.35,0.3,0
    assert sel(e, z, s, prune_ratio=0.5, strategy="moderate") == [2, 4, 5]


def test_random_is_seeded_uniform_over_valid():
    n = 1000
    args = (np.ones(n), np.zeros(n, np.int64), np.ones(n))
    valid = np.arange(n) % 3 != 0
    a = select_indices(
        *args, num_clusters=1, prune_ratio=0.9, valid=valid, strategy="random", seed=1
    )
    b = select_indices(
        *args, num_clusters=1, prune_ratio=0.9, valid=valid, strategy="random", seed=1
    )
    c = select_indices(
        *args, num_clusters=1, prune_ratio=0.9, valid=valid, strategy="random", seed=2
    )
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(a) == 100 and valid[a].all()


# --- properties ------------------------------------------------------------------------------------


@st.composite
def pools(draw):
    n = draw(st.integers(0, 80))
    k = draw(st.integers(1, 6))
    ints = st.lists(st.integers(0, 4), min_size=n, max_size=n)
    e = np.array(draw(ints), dtype=np.float32)  # few levels: many ties
    s = np.array(draw(ints), dtype=np.float32) / 4
    z = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), dtype=np.int16)
    valid = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    ratio = draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.85, 0.9, 0.99]))
    stage = draw(st.sampled_from(["none", "keep", "threshold"]))
    kw: dict = {}
    if stage == "keep":
        kw["entropy_keep"] = draw(st.sampled_from([0.1, 0.3, 0.5, 1.0]))
    elif stage == "threshold":
        kw["entropy_threshold"] = float(draw(st.integers(0, 4)))
    return e, z, s, valid, k, ratio, kw


@settings(max_examples=300, deadline=None)
@given(pools())
def test_matches_independent_reference(pool):
    e, z, s, valid, k, ratio, kw = pool
    got = select_indices(e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, **kw)
    assert got.tolist() == reference_select(
        e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, **kw
    )


@settings(max_examples=200, deadline=None)
@given(pools())
def test_moderate_matches_reference(pool):
    e, z, s, valid, k, ratio, _ = pool
    got = select_indices(
        e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, strategy="moderate"
    )
    assert got.tolist() == reference_moderate(z, s, num_clusters=k, prune_ratio=ratio, valid=valid)


def check_selection(e, z, s, valid, k, ratio, kw, strategy):
    """The shared property check every strategy must pass."""
    got = select_indices(
        e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, strategy=strategy, **kw
    )
    b = budget(len(e), ratio)
    assert got.dtype == np.int64
    assert np.all(np.diff(got) > 0)  # sorted, no duplicates
    assert valid[got].all()  # a subset of the valid samples
    assert len(got) <= b
    if strategy not in ("rsprune",):  # Stage-I-free strategies fill the budget when they can
        assert len(got) == min(b, int(valid.sum()))
    again = select_indices(
        e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, strategy=strategy, **kw
    )
    assert got.tolist() == again.tolist()  # deterministic
    return got


@settings(max_examples=100, deadline=None)
@given(pools(), st.sampled_from(sorted(STRATEGIES)))
def test_every_strategy_shared_properties(pool, strategy):
    e, z, s, valid, k, ratio, kw = pool
    check_selection(e, z, s, valid, k, ratio, kw, strategy)


@settings(max_examples=200, deadline=None)
@given(pools())
def test_size_and_quota(pool):
    e, z, s, valid, k, ratio, kw = pool
    got = select_indices(e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, **kw)
    # candidates = what Stage I lets through
    cand = np.asarray(reference_select(e, z, s, num_clusters=k, prune_ratio=0.0, valid=valid, **kw))
    b = budget(len(e), ratio)
    assert len(got) == min(b, len(cand))
    assert set(got.tolist()) <= set(cand.tolist())
    if len(cand) > b:
        q = b // k
        for c in range(k):
            n_c = int(np.sum(z[cand] == c))
            assert np.sum(z[got] == c) >= min(q, n_c)  # every cluster gets its quota


@settings(max_examples=150, deadline=None)
@given(pools(), st.randoms(use_true_random=False))
def test_permutation_invariant_with_distinct_scores(pool, rnd):
    e, z, s, valid, k, ratio, kw = pool
    n = len(e)
    # distinct scores: ties are resolved by position, which a permutation changes on purpose
    e = e + np.arange(n, dtype=np.float64) * 1e-4
    s = s + np.arange(n, dtype=np.float64) * 1e-4
    perm = list(range(n))
    rnd.shuffle(perm)
    p = np.array(perm, dtype=np.int64)
    base = select_indices(e, z, s, num_clusters=k, prune_ratio=ratio, valid=valid, **kw)
    moved = select_indices(
        e[p], z[p], s[p], num_clusters=k, prune_ratio=ratio, valid=valid[p], **kw
    )
    assert sorted(p[moved].tolist()) == base.tolist()
