"""Metadata filters (`PruneConfig.where`) and the opt-in cloud rule in the config layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rsprune_data import PruneConfig, PruneIndex
from rsprune_data.errors import ConfigError
from rsprune_data.filters import apply_where, check_where, clause_mask, parse_clause
from rsprune_data.plan import select_with_config, selection_summary
from rsprune_data.selection import select_indices


def test_where_validated_and_hashable() -> None:
    cfg = PruneConfig(prune_ratio=0.5, where=[["cloud_cover", "<=", 0.1], ("gsd", "<", 1)])
    assert cfg.where == (("cloud_cover", "<=", 0.1), ("gsd", "<", 1.0))
    hash(cfg)
    back = PruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    for bad in (
        [("x", "~", 1)],
        [("x", "<", "a")],
        [("x", "<", float("nan"))],
        [("x", "<")],
        "x<1",
        [("1x", "<", 1)],
        [("x", "<", True)],
    ):
        with pytest.raises(ConfigError, match="where"):
            PruneConfig(prune_ratio=0.5, where=bad)
    with pytest.raises(ConfigError, match="max_cloud"):
        PruneConfig(prune_ratio=0.5, max_cloud=1.5)


def test_parse_clause() -> None:
    assert parse_clause("cloud_cover<=0.1") == ("cloud_cover", "<=", 0.1)
    assert parse_clause(" score.cloud > 2e-1 ") == ("score.cloud", ">", 0.2)
    assert parse_clause("gsd != 1") == ("gsd", "!=", 1.0)
    for bad in ("gsd", "gsd <", "gsd ~ 1", "gsd < one"):
        with pytest.raises(ConfigError, match="--where"):
            parse_clause(bad)


def test_missing_never_passes_and_counts_are_sequential() -> None:
    v = np.array([0.0, 0.5, np.nan, 1.0], np.float32)
    assert clause_mask(v, "!=", 0.5).tolist() == [True, False, False, True]
    assert clause_mask(v, "<=", 0.5).tolist() == [True, True, False, False]
    cols = {"meta.a": v, "meta.b": np.array([1, 1, 1, 0], np.float32)}
    keep, dropped = apply_where(
        np.ones(4, bool), cols, check_where([("a", "<=", 1), ("b", "==", 1)])
    )
    assert keep.tolist() == [True, True, False, False] and dropped == [1, 1]


def test_unknown_or_ambiguous_column() -> None:
    idx = PruneIndex.from_arrays(
        [5.0] * 3,
        [0] * 3,
        [0.5] * 3,
        num_clusters=1,
        columns={"meta.x": [1, 2, 3], "score.x": [0, 0, 0], "meta.gsd": [1, 2, 3]},
    )
    with pytest.raises(ConfigError, match=r"'nope' is not in the index.*meta.gsd"):
        idx.select(PruneConfig(prune_ratio=0.5, where=[("nope", "<", 1)]))
    with pytest.raises(ConfigError, match="ambiguous"):
        idx.select(PruneConfig(prune_ratio=0.5, where=[("x", "<", 1)]))
    assert idx.select(
        PruneConfig(prune_ratio=0.0, entropy_filter="none", where=[("meta.x", ">", 1)])
    ).tolist() == [1, 2]


def test_where_is_eligibility_around_the_exact_selection() -> None:
    """The filtered selection is select_indices with the filters folded into `valid`."""
    rng = np.random.default_rng(3)
    n, k = 400, 8
    ent, z, s = rng.uniform(3, 7.5, n), rng.integers(0, k, n), rng.uniform(0, 1, n)
    cc = rng.uniform(0, 1, n)
    cc[rng.random(n) < 0.1] = np.nan
    cloud = rng.uniform(0, 1, n)
    nodata = rng.uniform(0, 0.1, n)
    idx = PruneIndex.from_arrays(
        ent,
        z,
        s,
        num_clusters=k,
        nodata=nodata,
        columns={"meta.cloud_cover": cc, "score.cloud": cloud},
    )
    cfg = PruneConfig(
        prune_ratio=0.8, entropy_threshold=4.0, where=[("cloud_cover", "<", 0.6)], max_cloud=0.7
    )
    got = select_with_config(idx, cfg)
    valid = (nodata <= 0.05) & (cc < 0.6) & ~(cloud > 0.7)
    want = select_indices(
        ent.astype(np.float32),
        z,
        s.astype(np.float32),
        num_clusters=k,
        prune_ratio=0.8,
        entropy_threshold=4.0,
        valid=valid,
    )
    assert got.tolist() == want.tolist()
    summ = selection_summary(idx, cfg, got)
    nod = int((nodata > 0.05).sum())
    after_nod = nodata <= 0.05
    w = int((after_nod & ~(cc < 0.6)).sum())
    c = int((after_nod & (cc < 0.6) & (cloud > 0.7)).sum())
    assert summ["nodata_dropped"] == nod
    assert summ["where"] == [{"filter": "cloud_cover < 0.6", "dropped": w}]
    assert summ["cloud_dropped"] == c
    assert summ["candidates"] == int((valid & (ent >= 4.0)).sum())
    # where applies with every strategy; max_cloud only with Stage I strategies
    rnd = select_with_config(
        idx,
        PruneConfig(
            prune_ratio=0.5, strategy="random", where=[("cloud_cover", "<", 0.6)], max_cloud=0.1
        ),
    )
    assert np.all(cc[rnd] < 0.6)
    assert len(rnd) == min(200, int((cc < 0.6).sum()))


def test_max_cloud_needs_the_column_and_keeps_unscored() -> None:
    idx = PruneIndex.from_arrays([5.0] * 4, [0] * 4, [0.5] * 4, num_clusters=1)
    with pytest.raises(ConfigError, match=r"score.cloud.*--force"):
        idx.select(PruneConfig(prune_ratio=0.0, max_cloud=0.5))
    idx = PruneIndex.from_arrays(
        [5.0] * 4,
        [0] * 4,
        [0.5] * 4,
        num_clusters=1,
        columns={"score.cloud": [0.1, 0.9, np.nan, 0.5]},
    )
    assert idx.select(
        PruneConfig(prune_ratio=0.0, max_cloud=0.5, entropy_filter="none")
    ).tolist() == [0, 2, 3]
