"""Tampered resume states are refused field by field, for both loaders (real shards, real passes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_datasets import make_indexed_shards

from rsprune_data import PruneConfig, PruneIndex, StateDictError
from rsprune_data.sampler import PrunedSampler
from rsprune_data.wds import PrunedWebDataset

CFG = PruneConfig(prune_ratio=0.0, entropy_filter="none", max_nodata=None)

# (field, tampered value, what the message must say)
COMMON = [
    ("epoch", -1, "an integer >= 0"),
    ("epoch", 1.5, "an integer >= 0"),
    ("epoch", True, "an integer >= 0"),
    ("epoch", "0", "an integer >= 0"),
    ("seed", -3, "an integer >= 0"),
    ("drop_last", 0, "true or false"),
    ("index_fingerprint", 7, "a string"),
    ("config", "0.5", "a dict"),
    ("config", {"prune_ratio": 1.5}, "not a valid PruneConfig"),
    ("config", {"prune_ratio": 0.5, "bogus": 1}, "not a valid PruneConfig"),
    ("version", True, "version"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [str(p) for p in make_indexed_shards(tmp_path_factory.mktemp("st"), (9, 6))]


def _refused(load: Any, state: dict[str, Any], field: str, value: Any, says: str) -> None:
    bad = {**state, field: value}
    with pytest.raises(StateDictError, match=field if field != "version" else "version") as err:
        load(json.loads(json.dumps(bad)))  # what a checkpoint file gives back
    assert says in str(err.value), str(err.value)


SAMPLER_CASES = [
    *COMMON,
    ("consumed", -1, "in [0,"),
    ("consumed", 3.7, "in [0,"),
    ("consumed", True, "in [0,"),
    ("consumed", 10**6, "in [0,"),
    ("num_samples", -1, "an integer >= 0"),
    ("num_replicas", 0, "an integer >= 1"),
    ("rank", 2, "an integer in [0, 1]"),
    ("rank", -1, "an integer in [0, 1]"),
    ("shuffle", "yes", "true or false"),
]


@pytest.mark.parametrize(("field", "value", "says"), SAMPLER_CASES)
def test_sampler_refuses_tampered_field(
    shards: list[str], field: str, value: Any, says: str
) -> None:
    index = PruneIndex.load(shards)
    s = PrunedSampler(index, CFG, num_replicas=2, rank=1, seed=0)
    it = iter(s)
    next(it)
    state = s.state_dict()
    _refused(
        PrunedSampler(index, CFG, num_replicas=2, rank=0, seed=0).load_state_dict,
        state,
        field,
        value,
        says,
    )


def test_sampler_negative_consumed_never_delivers_extra(shards: list[str]) -> None:
    """Before the check, ``consumed=-1`` delivered one sample more than the epoch holds."""
    index = PruneIndex.load(shards)
    s = PrunedSampler(index, CFG, seed=0)
    full = list(s)
    state = s.state_dict()
    with pytest.raises(StateDictError, match="consumed"):
        s.load_state_dict({**state, "consumed": -1})
    s.load_state_dict({**state, "consumed": 0})
    s.set_epoch(0)
    assert sorted(s) == sorted(full) and len(full) == len(index)
    with pytest.raises(StateDictError, match="must be a dict"):
        s.load_state_dict([("consumed", 0)])  # type: ignore[arg-type]


WDS_WORKER_CASES = [
    *COMMON,
    ("consumed", -1, "in [0,"),
    ("consumed", 3.7, "in [0,"),
    ("num_samples", -2, "an integer >= 0"),
    ("world_size", 0, "an integer >= 1"),
    ("rank", 1, "an integer in [0, 0]"),
    ("worker", 1, "an integer in [0, 0]"),
    ("rotation", -1, "an integer in [0, 0]"),
    ("num_workers", 0, "an integer >= 1"),
    ("finished", "no", "true or false"),
    ("shuffle_shards", 1, "true or false"),
]


@pytest.mark.parametrize(("field", "value", "says"), WDS_WORKER_CASES)
def test_wds_refuses_tampered_worker_state(
    shards: list[str], field: str, value: Any, says: str
) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=0)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    assert state["consumed"] == 1
    _refused(PrunedWebDataset(shards, CFG, seed=0).load_state_dict, state, field, value, says)


WDS_RANK_CASES = [
    ("delivered", -1, "in [0,"),
    ("delivered", 2.5, "in [0,"),
    ("delivered", 10**6, "in [0,"),
    ("batch_size", 0, "an integer >= 1"),
    ("batch_size", False, "an integer >= 1"),
    ("items", -1, "an integer >= 0"),
]


@pytest.mark.parametrize(("field", "value", "says"), WDS_RANK_CASES)
def test_wds_refuses_tampered_rank_state(
    shards: list[str], field: str, value: Any, says: str
) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=0)
    state = ds.state_dict(delivered=2, batch_size=2, num_workers=2)
    _refused(PrunedWebDataset(shards, CFG, seed=0).load_state_dict, state, field, value, says)


def test_wds_negative_consumed_never_delivers_extra(shards: list[str], tmp_path: Path) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=0, shuffle_shards=False)
    every = [s["__key__"] for s in ds]
    state = ds.state_dict()
    fresh = PrunedWebDataset(shards, CFG, seed=0, shuffle_shards=False)
    with pytest.raises(StateDictError, match="consumed"):
        fresh.load_state_dict({**state, "consumed": -1, "finished": False})
    fresh.load_state_dict({**state, "consumed": 4, "finished": False})
    assert [s["__key__"] for s in fresh] == every[4:]
    assert len(every) == 15
