"""PrunedSampler: properties, ratio-change timing, resume, real DataLoaders and real 2-process DDP."""

from __future__ import annotations

import json
import math
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from resume_conformance import run_resume_conformance
from test_datasets import make_indexed_shards, sample_key
from torch.utils.data import DataLoader, DistributedSampler

from rsprune_data import ConfigError, PruneConfig, PruneIndex, StateDictError
from rsprune_data.datasets import PrunedShardDataset
from rsprune_data.partition import epoch_order, rank_share
from rsprune_data.sampler import PrunedSampler


class FixedIndex:
    """A stand-in index whose selection is given (the sampler only needs select/fingerprint/len)."""

    def __init__(self, n: int, selected: NDArray[np.int64] | None = None, fingerprint: str = "f"):
        self.n = n
        self.selected = np.arange(n, dtype=np.int64) if selected is None else selected
        self.fingerprint = fingerprint
        self.calls = 0

    def select(self, config: PruneConfig) -> NDArray[np.int64]:
        self.calls += 1
        keep = math.floor((1 - config.prune_ratio) * len(self.selected) + 0.5)
        return self.selected[:keep]

    def __len__(self) -> int:
        return self.n


def random_index(n: int = 300, seed: int = 0) -> PruneIndex:
    rng = np.random.default_rng(seed)
    return PruneIndex.from_arrays(
        rng.uniform(3, 8, n), rng.integers(0, 6, n), rng.uniform(0, 1, n), num_clusters=6
    )


def json_roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))  # type: ignore[no-any-return]


def set_epoch(obj: Any, epoch: int) -> None:
    obj.set_epoch(epoch)


def shares(index: Any, config: Any, world: int, **kw: Any) -> list[list[int]]:
    return [
        list(PrunedSampler(index, config, num_replicas=world, rank=r, **kw)) for r in range(world)
    ]


# ------------------------------------------------------------------ properties over (n, R, ...)
def check_partition(parts: list[list[int]], selected: list[int], drop_last: bool) -> None:
    """The shared rank-partition property: equal lengths, nothing unselected, covering, disjoint
    apart from DistributedSampler padding (the first ``R*ceil(n/R) - n`` items of the order)."""
    n, world = len(selected), len(parts)
    each = n // world if drop_last else -(-n // world)
    assert [len(p) for p in parts] == [each] * world
    counts = Counter(x for p in parts for x in p)
    assert set(counts) <= set(selected)
    if drop_last:
        assert max(counts.values(), default=1) == 1
        assert len(counts) == each * world
    else:
        assert set(counts) == set(selected)
        assert sum(counts.values()) - len(counts) == each * world - n


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(0, 60),
    pool=st.integers(0, 40),
    world=st.integers(1, 5),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 1000),
    ratio=st.sampled_from([0.0, 0.3, 0.85]),
)
def test_partition_properties(
    n: int,
    pool: int,
    world: int,
    drop_last: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
    ratio: float,
) -> None:
    rng = np.random.default_rng(n)
    selected = np.sort(rng.choice(n + pool, size=n, replace=False)).astype(np.int64)
    index = FixedIndex(n + pool, selected)
    kw: dict[str, Any] = {"drop_last": drop_last, "shuffle": shuffle, "seed": seed}
    samplers = [PrunedSampler(index, ratio, num_replicas=world, rank=r, **kw) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    parts = [list(s) for s in samplers]
    want = index.select(PruneConfig(prune_ratio=ratio)).tolist()
    check_partition(parts, want, drop_last)
    assert [len(s) for s in samplers] == [len(p) for p in parts]
    # deterministic for (seed, epoch): a fresh sampler reproduces it
    again = PrunedSampler(index, ratio, num_replicas=world, rank=world - 1, **kw)
    again.set_epoch(epoch)
    assert list(again) == parts[-1]
    assert list(again) == parts[-1]  # re-iterating an epoch gives the same order


@pytest.mark.parametrize("n", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_same_layout_as_distributed_sampler(n: int, world: int, drop_last: bool) -> None:
    ds = list(range(n))
    for rank in range(world):
        ref: list[int] = list(
            DistributedSampler(
                ds, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last
            )
        )  # type: ignore[arg-type]
        ours = PrunedSampler(
            FixedIndex(n), 0.0, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last
        )
        assert list(ours) == ref
        assert len(ours) == len(ref)


def test_only_selected_positions_of_a_real_index() -> None:
    index = random_index()
    cfg = PruneConfig(prune_ratio=0.7)
    selected = index.select(cfg).tolist()
    assert 0 < len(selected) < len(index)
    check_partition(shares(index, cfg, 3), selected, drop_last=False)
    check_partition(shares(index, cfg, 3, drop_last=True), selected, drop_last=True)


def test_order_follows_seed_and_epoch() -> None:
    index = random_index()
    a, b = PrunedSampler(index, 0.5, seed=1), PrunedSampler(index, 0.5, seed=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    second = list(a)
    assert sorted(second) == sorted(first) and second != first
    assert list(PrunedSampler(index, 0.5, seed=2)) != first
    assert list(PrunedSampler(index, 0.5, shuffle=False)) == sorted(first)
    sel = index.select(PruneConfig(prune_ratio=0.5))
    assert first == epoch_order(sel, seed=1, epoch=0, shuffle=True).tolist()


def test_selection_is_cached_per_config() -> None:
    index = FixedIndex(50)
    s = PrunedSampler(index, 0.5)
    for e in range(4):
        s.set_epoch(e)
        list(s)
    assert index.calls == 1
    s.set_prune_ratio(0.2)
    list(s)
    s.set_prune_ratio(0.5)
    list(s)
    assert index.calls == 2


# ------------------------------------------------------------------ ratio changes
def test_ratio_change_applies_at_once_between_passes() -> None:
    s = PrunedSampler(FixedIndex(100), 0.5)
    assert len(s) == 50
    s.set_prune_ratio(0.8)  # no pass running: applies now, len() follows
    assert len(s) == 20 and s.config.prune_ratio == 0.8
    assert len(list(s)) == 20


def test_ratio_change_mid_pass_waits_for_the_next_epoch() -> None:
    s = PrunedSampler(FixedIndex(100), 0.5, seed=3)
    ref = list(PrunedSampler(FixedIndex(100), 0.5, seed=3))
    it = iter(s)
    head = [next(it) for _ in range(10)]
    s.set_prune_ratio(0.9)
    assert len(s) == 50 and s.config.prune_ratio == 0.5  # the running pass keeps its selection
    assert head + list(it) == ref
    assert len(s) == 10  # the pass ended: the change is in effect for the next one
    s.set_epoch(1)
    assert len(list(s)) == 10


def test_ratio_change_in_abandoned_pass_applies_at_set_epoch_or_next_iter() -> None:
    s = PrunedSampler(FixedIndex(100), 0.5)
    it = iter(s)
    next(it)
    s.set_prune_ratio(0.75)
    assert len(s) == 50
    del it
    assert len(list(s)) == 25  # the next iter() starts a new pass with the new ratio
    it = iter(s)
    next(it)
    s.set_config(PruneConfig(prune_ratio=0.9))
    with pytest.warns(RuntimeWarning, match="handed out only 1 of its 25"):  # abandoned on purpose
        s.set_epoch(1)
    assert len(s) == 10 and len(list(s)) == 10


def test_schedule_is_evaluated_per_epoch_and_agrees_across_ranks() -> None:
    index = random_index(400)

    def schedule(epoch: int) -> float | PruneConfig:
        return 0.5 if epoch < 2 else PruneConfig(prune_ratio=0.85, entropy_keep=0.5)

    world = 2
    samplers = [PrunedSampler(index, schedule, num_replicas=world, rank=r) for r in range(world)]
    for epoch, cfg in enumerate([PruneConfig(prune_ratio=0.5)] * 2 + [schedule(2)] * 2):
        assert isinstance(cfg, PruneConfig)
        for s in samplers:
            s.set_epoch(epoch)
            assert s.config == cfg
        check_partition([list(s) for s in samplers], index.select(cfg).tolist(), drop_last=False)
    samplers[0].set_prune_ratio(0.3)  # replaces the schedule
    samplers[0].set_epoch(7)
    assert samplers[0].config.prune_ratio == 0.3 and samplers[0].config.entropy_keep == 0.5


def test_bad_arguments() -> None:
    index = FixedIndex(10)
    with pytest.raises(ConfigError, match="prune_ratio"):
        PrunedSampler(index, 1.5)
    with pytest.raises(ConfigError, match="config"):
        PrunedSampler(index, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        PrunedSampler(index, 0.5, seed=-1)
    with pytest.raises(ConfigError, match="rank"):
        PrunedSampler(index, 0.5, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match=r"schedule\(0\)"):  # evaluated for epoch 0 at once
        PrunedSampler(index, lambda e: "x")  # type: ignore[arg-type,return-value]
    s = PrunedSampler(index, lambda e: 0.5 if e == 0 else 2.0)
    with pytest.raises(ConfigError, match="prune_ratio"):
        s.set_epoch(1)
    with pytest.raises(ConfigError, match="epoch"):
        PrunedSampler(index, 0.5).set_epoch(-1)


def test_explicit_rank_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    s = PrunedSampler(FixedIndex(10), 0.0)
    assert (s.rank, s.num_replicas) == (3, 4)
    s = PrunedSampler(FixedIndex(10), 0.0, num_replicas=2, rank=0)
    assert (s.rank, s.num_replicas) == (0, 2)


# ------------------------------------------------------------------ state
@pytest.mark.parametrize(
    "world,rank,drop_last,shuffle",
    [(1, 0, False, True), (3, 2, False, True), (3, 1, True, True), (2, 0, False, False)],
)
def test_resume_conformance_sampler(world: int, rank: int, drop_last: bool, shuffle: bool) -> None:
    index = random_index(101)
    report = run_resume_conformance(
        lambda: PrunedSampler(
            index, 0.4, num_replicas=world, rank=rank, drop_last=drop_last, shuffle=shuffle, seed=9
        ),
        set_epoch=set_epoch,
        epochs=2,
        transport=json_roundtrip,
        stop_points=("start", "middle", "last", "edge", "end", 1),
    )
    assert len(report.checked) == 12


def test_resume_conformance_with_a_schedule() -> None:
    index = random_index(150)
    report = run_resume_conformance(
        lambda: PrunedSampler(index, lambda e: (0.2, 0.7, 0.5)[e % 3], num_replicas=2, rank=1),
        set_epoch=set_epoch,
        epochs=3,
        transport=json_roundtrip,
    )
    assert report.epoch_lengths == [60, 23, 38, 60]


def test_load_without_set_epoch_restores_the_epoch() -> None:
    index = random_index()
    s = PrunedSampler(index, 0.5, seed=4)
    s.set_epoch(5)
    it = iter(s)
    head = [next(it) for _ in range(17)]
    state = s.state_dict()
    assert state["epoch"] == 5 and state["consumed"] == 17
    fresh = PrunedSampler(index, 0.5, seed=4)
    fresh.load_state_dict(state)
    assert fresh.epoch == 5 and fresh.state_dict() == state
    assert head + list(fresh) == _epoch(PrunedSampler(index, 0.5, seed=4), 5)


def _epoch(s: PrunedSampler, epoch: int) -> list[int]:
    s.set_epoch(epoch)
    return list(s)


def test_set_epoch_after_load_abandons_the_position() -> None:
    index = random_index()
    s = PrunedSampler(index, 0.5)
    s.set_epoch(2)
    it = iter(s)
    next(it)
    state = s.state_dict()
    fresh = PrunedSampler(index, 0.5)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)
    assert list(fresh) == _epoch(PrunedSampler(index, 0.5), 3)


def test_end_of_epoch_state_leaves_the_epoch_to_the_loop() -> None:
    index = random_index()
    s = PrunedSampler(index, 0.5)
    list(s)
    state = s.state_dict()
    assert state["consumed"] == state["num_samples"] == len(s)
    fresh = PrunedSampler(index, 0.7)  # a new ratio for the next epoch is fine: nothing remains
    fresh.set_epoch(1)
    fresh.load_state_dict(state)
    assert fresh.epoch == 1 and list(fresh) == _epoch(PrunedSampler(index, 0.7), 1)
    same = PrunedSampler(index, 0.5)
    same.load_state_dict(state)
    assert list(same) == []  # still inside epoch 0: nothing of it remains


def test_state_dict_consumed_override_for_plain_dataloaders() -> None:
    index = random_index()
    s = PrunedSampler(index, 0.5)
    ref = list(s)
    it = iter(s)
    for _ in range(30):  # the sampler ran ahead (worker prefetch) ...
        next(it)
    state = s.state_dict(consumed=12)  # ... but the model used 12
    fresh = PrunedSampler(index, 0.5)
    fresh.load_state_dict(state)
    assert list(fresh) == ref[12:]
    with pytest.raises(ConfigError, match="consumed"):
        s.state_dict(consumed=len(s) + 1)


def test_load_refuses_other_index_config_seed_world() -> None:
    index = random_index()
    s = PrunedSampler(index, 0.5, num_replicas=2, rank=0, seed=1)
    it = iter(s)
    next(it)
    state = s.state_dict()
    with pytest.raises(StateDictError, match="index_fingerprint"):
        PrunedSampler(random_index(seed=9), 0.5, num_replicas=2, rank=0, seed=1).load_state_dict(
            state
        )
    with pytest.raises(StateDictError, match=r"prune_ratio.*set_config"):
        PrunedSampler(index, 0.6, num_replicas=2, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(StateDictError, match="seed=1"):
        PrunedSampler(index, 0.5, num_replicas=2, rank=0, seed=2).load_state_dict(state)
    with pytest.raises(StateDictError, match="num_replicas"):
        PrunedSampler(index, 0.5, num_replicas=3, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(StateDictError, match="not a PrunedSampler state"):
        PrunedSampler(index, 0.5).load_state_dict({"yielded": 3})
    with pytest.raises(StateDictError, match="version"):
        PrunedSampler(index, 0.5, num_replicas=2, rank=0, seed=1).load_state_dict(
            {**state, "version": 99}
        )
    # rank is informational: rank 0's state resumes rank 1 (ranks step in lockstep)
    other = PrunedSampler(index, 0.5, num_replicas=2, rank=1, seed=1)
    other.load_state_dict(state)
    assert len(list(other)) == len(s) - 1


# ------------------------------------------------------------------ real DataLoaders, real shards
@pytest.fixture(scope="module")
def shard_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], PruneIndex]:
    shards = [str(p) for p in make_indexed_shards(tmp_path_factory.mktemp("shards"), (9, 13, 11))]
    return shards, PruneIndex.load(shards)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_delivers_each_selected_sample_once(
    shard_index: tuple[list[str], PruneIndex], num_workers: int
) -> None:
    _, index = shard_index
    keys = list(index.keys)
    ds = PrunedShardDataset(index, transform=sample_key)
    world = 2
    samplers = [PrunedSampler(index, 0.3, num_replicas=world, rank=r, seed=5) for r in range(world)]
    loaders = [
        DataLoader(
            ds, batch_size=4, sampler=s, num_workers=num_workers, persistent_workers=num_workers > 0
        )
        for s in samplers
    ]
    for epoch, ratio in enumerate([0.3, 0.3, 0.6]):
        for s in samplers:
            s.set_prune_ratio(ratio)  # between epochs: in effect for this epoch
            s.set_epoch(epoch)
        got = [[k for batch in dl for k in batch] for dl in loaders]
        selected = index.select(PruneConfig(prune_ratio=ratio)).tolist()
        pos = {k: i for i, k in enumerate(keys)}
        check_partition([[pos[k] for k in g] for g in got], selected, drop_last=False)
        for r, g in enumerate(got):  # the order is the sampler's, through workers and batches
            order = epoch_order(np.asarray(selected, np.int64), seed=5, epoch=epoch, shuffle=True)
            assert g == [keys[p] for p in rank_share(order, world, r).tolist()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resume_is_exact(
    shard_index: tuple[list[str], PruneIndex], num_workers: int
) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    _, index = shard_index
    ds = PrunedShardDataset(index, transform=sample_key)

    def make() -> StatefulDataLoader:
        sampler = PrunedSampler(index, lambda e: (0.2, 0.5)[e % 2], num_replicas=2, rank=1, seed=11)
        return StatefulDataLoader(
            ds,
            batch_size=2,
            sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    report = run_resume_conformance(
        make,
        set_epoch=lambda dl, e: dl.sampler.set_epoch(e),
        key=tuple,
        epochs=2,
        stop_points=("start", 1, "middle", "last", "edge", "end"),
    )
    assert report.epoch_lengths == [7, 5, 7]  # batches of 2 from 13 and 9 items per rank


def test_plain_dataloader_with_workers_resumes_with_consumed_override(
    shard_index: tuple[list[str], PruneIndex],
) -> None:
    _, index = shard_index
    ds = PrunedShardDataset(index, transform=sample_key)
    sampler = PrunedSampler(index, 0.1, seed=2)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2)
    ref = [k for b in loader for k in b]
    it = iter(loader)
    seen = [k for _ in range(4) for k in next(it)]
    assert sampler.state_dict()["consumed"] > len(seen)  # the workers prefetched ahead
    state = sampler.state_dict(consumed=len(seen))
    del it
    fresh = PrunedSampler(index, 0.1, seed=2)
    fresh.load_state_dict(state)
    rest = [k for b in DataLoader(ds, batch_size=3, sampler=fresh) for k in b]
    assert seen + rest == ref


# ------------------------------------------------------------------ real 2-process DDP (gloo)
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ddp_schedule(epoch: int) -> float:
    return 0.4 if epoch == 0 else 0.7


def _ddp_worker(rank: int, world: int, port: int, shards: list[str], out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        index = PruneIndex.load(shards)
        ds = PrunedShardDataset(index, transform=sample_key)
        sampler = PrunedSampler(index, ddp_schedule, seed=13)  # rank/world from the process group
        # fork: a process started by mp.spawn would spawn its workers too (seconds each)
        loader = DataLoader(
            ds,
            batch_size=3,
            sampler=sampler,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context="fork",
        )
        epochs: list[dict[str, Any]] = []
        result = {"rank": sampler.rank, "world": sampler.num_replicas, "epochs": epochs}
        for epoch in range(3):
            if epoch == 2:
                sampler.set_config(PruneConfig(prune_ratio=0.2))  # replaces the schedule
            sampler.set_epoch(epoch)
            keys = [k for batch in loader for k in batch]
            epochs.append({"keys": keys, "len": len(sampler), "ratio": sampler.config.prune_ratio})
        del loader  # shut the persistent workers down now, not at interpreter exit
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_real_ddp_two_processes(shard_index: tuple[list[str], PruneIndex], tmp_path: Path) -> None:
    shards, index = shard_index
    out = tmp_path / "ddp.json"
    world = 2
    mp.spawn(_ddp_worker, args=(world, free_port(), shards, str(out)), nprocs=world, join=True)
    results = json.loads(out.read_text())
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    keys = list(index.keys)
    pos = {k: i for i, k in enumerate(keys)}
    for epoch, ratio in enumerate([0.4, 0.7, 0.2]):
        got = [r["epochs"][epoch] for r in results]
        assert [g["ratio"] for g in got] == [ratio, ratio]  # every rank agrees on the epoch's ratio
        selected = index.select(PruneConfig(prune_ratio=ratio)).tolist()
        check_partition([[pos[k] for k in g["keys"]] for g in got], selected, drop_last=False)
        assert [g["len"] for g in got] == [len(g["keys"]) for g in got]
        for rank, g in enumerate(got):  # same order as a single process with explicit rank
            ref = PrunedSampler(index, ratio, num_replicas=world, rank=rank, seed=13)
            ref.set_epoch(epoch)
            assert g["keys"] == [keys[p] for p in ref]
    assert torch.distributed.is_available()


def test_a_config_the_index_cannot_serve_is_refused_where_it_is_given() -> None:
    """An entropy-only index and a strategy that needs clusters: the error comes from the
    constructor or set_config, not from the first batch inside a DataLoader worker."""
    from rsprune_data import ConfigError, PrunedWebDataset, PruneIndex

    n = 40
    index = PruneIndex.from_arrays(
        np.linspace(4, 7, n),
        np.full(n, -1),
        np.zeros(n),
        num_clusters=0,
        offsets=np.arange(n) * 1024,
        lengths=np.full(n, 1024),
        shard_ids=np.zeros(n, np.int64),
        shards=["s-000000.tar"],
        keys=[f"k{i}" for i in range(n)],
    )
    with pytest.raises(ConfigError, match="needs cluster assignments"):
        PrunedSampler(index, 0.5)
    with pytest.raises(ConfigError, match="needs cluster assignments"):
        PrunedWebDataset(index, 0.5)
    ok = PrunedSampler(index, PruneConfig(prune_ratio=0.5, strategy="entropy"))
    with pytest.raises(ConfigError, match="dedup_threshold needs cluster"):
        ok.set_config(PruneConfig(prune_ratio=0.5, strategy="entropy", dedup_threshold=0.9))
    ds = PrunedWebDataset(index, PruneConfig(prune_ratio=0.5, strategy="entropy"))
    with pytest.raises(ConfigError, match="needs cluster assignments"):
        ds.set_config(0.7)  # a bare ratio: the default strategy again
