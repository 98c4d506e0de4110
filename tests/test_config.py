"""PruneConfig validation and the config layer (no-data fold-in, data-driven Stage I, summary)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference_selection import reference_select

from rsprune_data import PruneConfig, select_with_config, selection_summary
from rsprune_data.errors import ConfigError
from rsprune_data.plan import AUTO_MAX_BITS, AUTO_MIN_BITS, auto_entropy_threshold


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prune_ratio": 1.2}, r"`prune_ratio` must be in \[0, 1\), got 1.2"),
        ({"prune_ratio": -0.1}, r"`prune_ratio` must be in \[0, 1\), got -0.1"),
        ({"prune_ratio": 1.0}, r"`prune_ratio` must be in \[0, 1\), got 1.0"),
        ({"prune_ratio": float("nan")}, r"`prune_ratio` must be a finite number, got nan"),
        ({"prune_ratio": "0.5"}, r"`prune_ratio` must be a finite number, got '0.5'"),
        ({"prune_ratio": True}, r"`prune_ratio` must be a finite number, got True"),
        ({"prune_ratio": 0.5, "entropy_keep": 0.0}, r"`entropy_keep` must be in \(0, 1\], got 0.0"),
        (
            {"prune_ratio": 0.5, "entropy_threshold": 9},
            r"`entropy_threshold` must be in \[0, 8\], got 9",
        ),
        ({"prune_ratio": 0.5, "entropy_keep": 0.3, "entropy_threshold": 4.0}, "exclusive"),
        (
            {"prune_ratio": 0.5, "strategy": "kmeans"},
            r"`strategy` must be one of \['entropy', 'moderate'",
        ),
        ({"prune_ratio": 0.5, "seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"prune_ratio": 0.5, "max_nodata": 2.0}, r"`max_nodata` must be in \[0, 1\], got 2.0"),
        (
            {"prune_ratio": 0.5, "entropy_filter": "otsu"},
            r"`entropy_filter` must be one of \['auto', 'none'\]",
        ),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        PruneConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_frozen_and_round_trip():
    cfg = PruneConfig(prune_ratio=0.85, entropy_keep=0.3, strategy="stratified", seed=3)
    with pytest.raises(AttributeError):
        cfg.prune_ratio = 0.1  # type: ignore[misc]
    assert PruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace(prune_ratio=0.5).prune_ratio == 0.5
    with pytest.raises(ConfigError, match=r"unknown PruneConfig field\(s\) \['ratio'\]"):
        PruneConfig.from_dict({"ratio": 0.5})
    with pytest.raises(ConfigError, match="`prune_ratio` is required"):
        PruneConfig.from_dict({})


@given(st.floats(0, 0.999), st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_round_trip_property(ratio, keep):
    cfg = PruneConfig(prune_ratio=ratio, entropy_keep=keep)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg


class Arrays:
    """A tiny in-memory index (the config layer reads only these attributes)."""

    def __init__(self, entropy, cluster_ids, similarity, nodata=None, valid=None, k=2):
        self.entropy = np.asarray(entropy, np.float32)
        self.cluster_ids = np.asarray(cluster_ids, np.int16)
        self.similarity = np.asarray(similarity, np.float32)
        self.nodata = None if nodata is None else np.asarray(nodata, np.float32)
        self.valid = np.ones(len(entropy), bool) if valid is None else np.asarray(valid, bool)
        self.num_clusters = k

    def __len__(self):
        return len(self.entropy)


def test_auto_threshold_rule():
    bulk = np.linspace(6.0, 7.0, 101)
    # robust fence: median 6.5, MAD 0.25 -> 6.5 - 3*1.4826*0.25 = 5.388 -> capped at 4.5
    assert auto_entropy_threshold(bulk) == AUTO_MAX_BITS
    wide = np.linspace(2.0, 8.0, 101)  # median 5, MAD 1.5 -> 5 - 6.67 < floor
    assert auto_entropy_threshold(wide) == AUTO_MIN_BITS
    mid = np.linspace(4.5, 6.5, 101)  # median 5.5, MAD 0.5 -> 5.5 - 2.2239 = 3.276
    assert auto_entropy_threshold(mid) == pytest.approx(5.5 - 3 * 1.4826 * 0.5)


def test_max_nodata_and_auto_stage1_in_config_layer():
    e = [7.0, 6.9, 7.1, 1.0, 6.8, 7.2]
    nod = [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    idx = Arrays(e, [0, 0, 1, 1, 0, 1], [0.9, 0.95, 0.8, 0.99, 0.7, 0.6], nodata=nod)
    cfg = PruneConfig(prune_ratio=0.0)
    # sample 1: too much no-data; sample 3: below the auto cut (4.5 bits)
    assert select_with_config(idx, cfg).tolist() == [0, 2, 4, 5]
    summ = selection_summary(idx, cfg)
    assert summ["stage1_rule"] == "auto" and summ["entropy_threshold"] == AUTO_MAX_BITS
    assert (summ["nodata_dropped"], summ["stage1_dropped"], summ["selected"]) == (1, 1, 4)
    # explicit arguments override the data-driven cut; max_nodata=None disables the fold-in
    explicit = PruneConfig(prune_ratio=0.0, entropy_threshold=0.5, max_nodata=None)
    assert select_with_config(idx, explicit).tolist() == [0, 1, 2, 3, 4, 5]
    off = PruneConfig(prune_ratio=0.0, entropy_filter="none")
    assert select_with_config(idx, off).tolist() == [0, 2, 3, 4, 5]
    # baselines other than entropy see every valid sample
    assert select_with_config(idx, PruneConfig(prune_ratio=0.0, strategy="nearest")).size == 6


def test_config_layer_equals_select_indices_with_explicit_arguments():
    rng = np.random.default_rng(0)
    n = 400
    e, z, s = rng.random(n) * 8, rng.integers(0, 5, n), rng.random(n)
    nod = (rng.random(n) < 0.1) * rng.random(n)
    idx = Arrays(e, z, s, nodata=nod, k=5)
    cfg = PruneConfig(prune_ratio=0.85, entropy_keep=0.4, max_nodata=0.05)
    want = reference_select(
        idx.entropy,
        idx.cluster_ids,
        idx.similarity,
        num_clusters=5,
        prune_ratio=0.85,
        entropy_keep=0.4,
        valid=idx.nodata <= 0.05,
    )
    assert select_with_config(idx, cfg).tolist() == want


def test_index_without_clusters_names_the_fix():
    idx = Arrays([5.0, 6.0], [-1, -1], [0.0, 0.0], k=0)
    with pytest.raises(ConfigError, match="built without centroids"):
        select_with_config(idx, PruneConfig(prune_ratio=0.5))
    assert select_with_config(idx, PruneConfig(prune_ratio=0.5, strategy="entropy")).tolist() == [1]
