"""PrunedWebDataset: real tar shards, real DataLoaders (0/2 workers, persistent), real 2-process DDP."""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import random
import socket
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from resume_conformance import run_resume_conformance
from torch.utils.data import DataLoader

from rsprune_data import ConfigError, PruneConfig, StaleIndexError, StateDictError
from rsprune_data import index as idx
from rsprune_data.integrity import range_checksums
from rsprune_data.tario import scan_tar
from rsprune_data.wds import PrunedWebDataset, epoch_plan, worker_batches

CFG = PruneConfig(prune_ratio=0.5, entropy_filter="none")
COUNTS = [7, 5, 9, 1, 6, 4]  # samples per shard; a shard of one is often fully pruned


# --- shards and indexes -------------------------------------------------------------------------


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(
    root: Path,
    counts: list[int],
    *,
    seed: int = 0,
    clusters: int = 3,
    blank_shards: tuple[int, ...] = (),
) -> list[str]:
    """Shards of tiny real JPEGs, and index files with real byte ranges and random scores."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, n in enumerate(counts):
        path = root / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(n):
                w.write({"__key__": f"s{s}/k{i:03d}", "jpg": _jpeg(rng), "cls.txt": b"%d" % i})
        ts = scan_tar(path)
        entropy = np.zeros(n) if s in blank_shards else rng.uniform(5, 8, n)
        arrays = {
            "entropy": entropy,
            "nodata": np.zeros(n),
            "cluster_id": rng.integers(0, clusters, n),
            "similarity": rng.uniform(0, 1, n),
            "valid": np.ones(n),
            "reason": np.zeros(n),
            "offset": [t.offset for t in ts],
            "length": [t.length for t in ts],
            "checksum": range_checksums(str(path), [(t.offset, t.length) for t in ts]),
            **idx.encode_keys([t.key for t in ts]),
        }
        meta = {
            **idx.shard_metadata(path),
            "encoder": "",
            "centroids_digest": "",
            "num_clusters": str(clusters),
            "reasons": json.dumps(["ok"]),
        }
        idx.write_index(idx.index_path_for(path), arrays, meta)
        shards.append(str(path))
    return shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("wds"), COUNTS)


@pytest.fixture(scope="module")
def reference(shards: list[str]) -> dict[str, dict[str, Any]]:
    """Every sample of the shards as webdataset itself yields it, by key."""
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def selected_keys(ds: PrunedWebDataset) -> list[str]:
    return [ds.index.keys[int(g)] for g in ds.selected]


def sample_key(sample: dict[str, Any]) -> str:
    return str(sample["__key__"])


def keys_of(loader: Any) -> list[str]:
    out: list[str] = []
    for item in loader:
        out.extend(item if isinstance(item, list) else [item])
    return out


# --- the plan (pure numpy) ----------------------------------------------------------------------


def reference_split(
    selected: np.ndarray,
    starts: np.ndarray,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    ranks: int,
    workers: int,
    drop_last: bool,
) -> list[list[np.ndarray]]:
    """The documented split, built the slow obvious way."""
    nshards = len(starts) - 1
    order = np.random.default_rng([seed, epoch]).permutation(nshards) if shuffle else range(nshards)
    seq = np.concatenate(
        [np.zeros(0, np.int64)]
        + [selected[(selected >= starts[s]) & (selected < starts[s + 1])] for s in order]
    )
    n = len(seq)
    each = n // ranks if drop_last else -(-n // ranks)
    full = np.resize(seq, each * ranks) if each * ranks > n else seq[: each * ranks]
    return [np.array_split(full[r * each : (r + 1) * each], workers) for r in range(ranks)]


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=7),
    data=st.data(),
    ranks=st.integers(1, 4),
    workers=st.integers(1, 4),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
)
def test_plan_matches_reference_split(
    counts: list[int],
    data: Any,
    ranks: int,
    workers: int,
    drop_last: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> None:
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(starts[-1])
    mask = data.draw(st.lists(st.booleans(), min_size=total, max_size=total))
    selected = np.flatnonzero(mask).astype(np.int64)
    plan = epoch_plan(
        selected,
        starts,
        seed=seed,
        epoch=epoch,
        shuffle_shards=shuffle,
        world_size=ranks,
        drop_last=drop_last,
    )
    want = reference_split(
        selected,
        starts,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        ranks=ranks,
        workers=workers,
        drop_last=drop_last,
    )
    got = [
        [plan.positions(*plan.worker_span(r, w, workers)) for w in range(workers)]
        for r in range(ranks)
    ]
    for r in range(ranks):
        for w in range(workers):
            assert got[r][w].tolist() == want[r][w].tolist()
    per_rank = [sum(len(x) for x in g) for g in got]
    assert len(set(per_rank)) == 1  # equal per-rank counts
    flat = np.concatenate([x for g in got for x in g] + [np.zeros(0, np.int64)])
    counts_ = Counter(flat.tolist())
    assert set(counts_) <= set(selected.tolist())  # nothing unselected
    if not drop_last:
        assert set(counts_) == set(selected.tolist())  # every selected sample delivered ...
        assert len(flat) - len(selected) < ranks  # ... padding only to the next multiple of R
    else:
        assert max(counts_.values(), default=1) == 1 and len(flat) > len(selected) - ranks


def test_worker_batches_and_plan_docstring() -> None:
    assert worker_batches(10, 3, 2) == [2, 2, 2]
    assert worker_batches(7, 0, 3) == [3]
    plan = epoch_plan(
        np.array([0, 2, 3, 5]),
        np.array([0, 3, 6]),
        seed=0,
        epoch=0,
        shuffle_shards=False,
        world_size=3,
        drop_last=False,
    )
    assert [plan.positions(*plan.rank_span(r)).tolist() for r in range(3)] == [
        [0, 2],
        [3, 5],
        [0, 2],
    ]


# --- samples and pipeline stages ----------------------------------------------------------------


def test_samples_are_webdataset_samples(shards: list[str], reference: dict[str, Any]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=1)
    got = list(ds)
    assert sorted(s["__key__"] for s in got) == sorted(selected_keys(ds))
    for s in got:
        assert s == reference[s["__key__"]]  # same members, bytes, __url__, __local_path__
    assert 0 < len(got) < len(reference)


def test_stream_shards_drop_unselected_by_position(
    shards: list[str], reference: dict[str, Any], tmp_path: Path
) -> None:
    local = PrunedWebDataset(shards, CFG, seed=1)
    urls = [f"pipe:cat {s}" for s in shards]
    stream = PrunedWebDataset(urls, CFG, seed=1, index_dir=str(Path(shards[0]).parent))
    got = list(stream)
    assert [s["__key__"] for s in got] == [s["__key__"] for s in local]
    for s, url in zip(got, (s["__url__"] for s in got), strict=True):
        want = {k: v for k, v in reference[s["__key__"]].items() if k != "__local_path__"}
        assert s == {**want, "__url__": url}
    # webdataset itself gives these keys for the same urls
    assert all(s["__key__"] in reference for s in wds.WebDataset(urls[:1], shardshuffle=False))


def test_shards_without_selected_samples_are_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "x"
    shards = write_shards(root, [6, 6, 6], seed=3, blank_shards=(1,))
    os.remove(shards[1])  # opening it would raise; Stage I drops all of its samples
    cfg = PruneConfig(prune_ratio=0.3, entropy_threshold=1.0)
    local = [s["__key__"] for s in PrunedWebDataset(shards, cfg, check_stale=False, seed=1)]
    stream = PrunedWebDataset([f"pipe:cat {s}" for s in shards], cfg, index_dir=str(root), seed=1)
    assert local == [s["__key__"] for s in stream]
    assert len(local) == 12 - budget_shortfall(cfg) and not any(k.startswith("s1/") for k in local)
    with pytest.raises(FileNotFoundError):  # the control: with shard 1 selected it is opened
        list(PrunedWebDataset(shards, CFG, check_stale=False, shuffle_shards=False))


def budget_shortfall(cfg: PruneConfig) -> int:
    return 12 - min(12, int(np.floor((1 - cfg.prune_ratio) * 18 + 0.5)))


def test_reads_only_selected_byte_ranges(
    shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rsprune_data.reading.local as local

    asked: list[tuple[str, int, int]] = []  # (shard, offset, length) of every run read
    real = local.LocalFile.read_into

    def spy(self: local.LocalFile, runs: Any, out: memoryview) -> None:
        starts, stops = runs.start.tolist(), runs.stop.tolist()
        asked.extend((self.path, a, b - a) for a, b in zip(starts, stops, strict=True))
        real(self, runs, out)

    monkeypatch.setattr(local.LocalFile, "read_into", spy)
    ds = PrunedWebDataset(shards, CFG, seed=2, max_gap=0)
    n = len(list(ds))
    sel = ds.selected
    index = ds.index
    want = {
        (index.shards[index.shard_ids[g]], int(index.offsets[g]), int(index.lengths[g]))
        for g in sel.tolist()
    }
    # max_gap=0: one read per run of touching samples, covering exactly the selected bytes
    assert n == len(sel) and sum(a[2] for a in asked) == sum(w[2] for w in want)
    assert all(
        any(s == t and o <= wo and wo + wn <= o + m for t, o, m in asked) for s, wo, wn in want
    )


def test_chains_like_webdataset(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=0)
    pipe = ds.decode("rgb8").to_tuple("jpg", "cls.txt").shuffle(5, rng=random.Random(0)).batched(4)
    batches = list(pipe)
    assert sum(len(b[1]) for b in batches) == ds.num_samples
    assert batches[0][0].shape == (4, 8, 8, 3)  # decoded images collated into a numpy batch
    assert isinstance(pipe, PrunedWebDataset)
    pipe.set_epoch(3)  # a chained copy shares epoch and config with the dataset
    assert ds.epoch == 3


def test_deterministic_for_seed_and_epoch(shards: list[str]) -> None:
    def run(seed: int, epoch: int) -> list[str]:
        ds = PrunedWebDataset(shards, CFG, seed=seed)
        ds.set_epoch(epoch)
        return [s["__key__"] for s in ds]

    assert run(0, 1) == run(0, 1)
    orders = {tuple(run(0, e)) for e in range(4)} | {tuple(run(s, 0)) for s in range(1, 4)}
    assert len(orders) > 1 and len({frozenset(o) for o in orders}) == 1


def test_stale_index_is_refused(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "y", [4, 4], seed=5)
    arrays, meta = idx.read_index(idx.index_path_for(shards[0]))
    arrays.update(idx.encode_keys([f"other{i}" for i in range(4)]))
    idx.write_index(idx.index_path_for(shards[0]), arrays, meta)
    with pytest.raises(StaleIndexError, match="shard changed since indexing"):
        list(PrunedWebDataset(shards, PruneConfig(prune_ratio=0.0, entropy_filter="none")))


# --- DataLoaders, ranks, workers ----------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("ranks", [1, 2, 5])  # 5 ranks x 2 workers = 10 workers > 6 shards
def test_loader_delivers_each_selected_sample_once(
    shards: list[str], num_workers: int, ranks: int
) -> None:
    per_rank: list[list[str]] = []
    for rank in range(ranks):
        ds = PrunedWebDataset(shards, CFG, seed=4, rank=rank, world_size=ranks)
        ds.set_epoch(1)
        loader = DataLoader(ds.map(sample_key), batch_size=2, num_workers=num_workers)
        per_rank.append(keys_of(loader))
        assert len(per_rank[-1]) == ds.num_samples
    sel = selected_keys(ds)
    flat = [k for keys in per_rank for k in keys]
    assert len({len(k) for k in per_rank}) == 1  # equal per-rank counts
    assert set(flat) == set(sel)  # all selected, nothing else
    assert len(flat) == -(-len(sel) // ranks) * ranks  # padding only up to a multiple of ranks
    assert sum(c - 1 for c in Counter(flat).values()) == len(flat) - len(sel)


def test_streams_split_inside_shards_across_ranks_and_workers(shards: list[str]) -> None:
    urls = [f"pipe:cat {s}" for s in shards]
    root = str(Path(shards[0]).parent)
    got, batches = [], []
    for rank in range(4):  # 4 ranks x 2 workers = 8 workers > 6 shards
        ds = PrunedWebDataset(urls, CFG, seed=8, rank=rank, world_size=4, index_dir=root)
        items = list(DataLoader(ds.map(sample_key), batch_size=2, num_workers=2))
        batches.append(len(items))
        got.append([k for b in items for k in b])
        assert len(items) == ds.num_batches(2, num_workers=2)
    local = PrunedWebDataset(shards, CFG, seed=8, rank=3, world_size=4)
    assert got[3] == keys_of(DataLoader(local.map(sample_key), batch_size=2, num_workers=2))
    flat = [k for g in got for k in g]
    assert set(flat) == set(selected_keys(ds)) and len({len(g) for g in got}) == 1
    assert len(set(batches)) == 1


def test_drop_last_delivers_no_duplicates(shards: list[str]) -> None:
    got = [
        keys_of(
            DataLoader(
                PrunedWebDataset(shards, CFG, rank=r, world_size=4, drop_last=True).map(sample_key),
                batch_size=None,
                num_workers=2,
            )
        )
        for r in range(4)
    ]
    flat = [k for g in got for k in g]
    assert len(set(flat)) == len(flat) and len({len(g) for g in got}) == 1


def test_persistent_workers_see_epoch_and_ratio_changes(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=7)
    persistent = DataLoader(
        ds.map(sample_key), batch_size=3, num_workers=2, persistent_workers=True
    )
    fresh = PrunedWebDataset(shards, CFG, seed=7)
    ratios = [0.5, 0.5, 0.8, 0.2]
    for epoch, ratio in enumerate(ratios):
        ds.set_epoch(epoch)
        ds.set_prune_ratio(ratio)
        fresh.set_epoch(epoch)
        fresh.set_prune_ratio(ratio)
        got = keys_of(persistent)
        want = keys_of(DataLoader(fresh.map(sample_key), batch_size=3, num_workers=2))
        assert got == want  # same order as workers started for this epoch
        assert sorted(got) == sorted(selected_keys(fresh))
        assert ds.config.prune_ratio == ratio
        assert len(got) == fresh.num_samples


def test_schedule_with_persistent_workers(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, _schedule, seed=1)
    loader = DataLoader(ds.map(sample_key), batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        got = keys_of(loader)
        assert sorted(got) == sorted(selected_keys(ds))
        assert len(got) == ds.index.select(_schedule(epoch)).shape[0]
    # A schedule set after persistent workers started cannot reach them: the worker's copy
    # (simulated here; a real worker that raises costs torch 5 s per worker at shutdown) refuses.
    worker_copy = copy.copy(ds._source)
    ds.set_config(_schedule)
    with pytest.raises(ConfigError, match="persistent"):
        worker_copy.config_for(0)


def _schedule(epoch: int) -> PruneConfig:
    return CFG.replace(prune_ratio=(0.2, 0.6, 0.9)[min(epoch, 2)])


def test_spawned_persistent_workers(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=2)
    loader = DataLoader(
        ds.map(sample_key),
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )  # pickled dataset, index re-opened
    for epoch, ratio in ((0, 0.5), (1, 0.8)):
        ds.set_epoch(epoch)
        ds.set_prune_ratio(ratio)
        assert sorted(keys_of(loader)) == sorted(selected_keys(ds))


def test_ratio_change_during_a_pass_applies_to_the_next(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=0)
    it = iter(ds)
    first = [next(it)["__key__"] for _ in range(3)]
    ds.set_prune_ratio(0.9)
    rest = [s["__key__"] for s in it]
    assert len(first + rest) == ds.index.select(CFG).shape[0]
    assert len(list(ds)) == ds.index.select(CFG.replace(prune_ratio=0.9)).shape[0]


# --- resume -------------------------------------------------------------------------------------


def _json(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))  # type: ignore[no-any-return]


def _set_epoch(obj: Any, epoch: int) -> None:
    obj.ds.set_epoch(epoch) if hasattr(obj, "ds") else obj.set_epoch(epoch)


def test_resume_dataset_in_process(shards: list[str]) -> None:
    report = run_resume_conformance(
        lambda: PrunedWebDataset(shards, CFG, seed=3),
        set_epoch=_set_epoch,
        key=sample_key,
        transport=_json,
        stop_points=("start", "middle", "last", "edge", "end", 1),
    )
    assert len(report.checked) == 12


class PlainLoader:
    """A plain DataLoader plus the training loop's count of delivered batches (its step)."""

    def __init__(self, ds: PrunedWebDataset, batch_size: int, num_workers: int) -> None:
        self.ds, self.batch_size, self.num_workers = ds, batch_size, num_workers
        self.loader = DataLoader(ds.map(sample_key), batch_size=batch_size, num_workers=num_workers)
        self.delivered = 0
        self._start = 0

    def __iter__(self) -> Iterator[list[str]]:
        self.delivered, self._start = self._start, 0
        return self._run()

    def _run(self) -> Iterator[list[str]]:
        for batch in self.loader:
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers == 0:
            return self.ds.state_dict()  # the dataset is iterated in this process
        return self.ds.state_dict(
            delivered=self.delivered, batch_size=self.batch_size, num_workers=self.num_workers
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ds.load_state_dict(state)
        if "delivered" in state and state["epoch"] == self.ds.epoch:
            self._start = state["delivered"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_plain_dataloader(shards: list[str], num_workers: int) -> None:
    run_resume_conformance(
        lambda: PlainLoader(PrunedWebDataset(shards, CFG, seed=5), 2, num_workers),
        set_epoch=_set_epoch,
        key=tuple,
        transport=_json,
        stop_points=("start", "middle", "last", "edge", "end", 1, 3),
    )


def test_resume_plain_dataloader_rank_of_two(shards: list[str]) -> None:
    run_resume_conformance(
        lambda: PlainLoader(PrunedWebDataset(shards, CFG, seed=5, rank=1, world_size=2), 2, 2),
        set_epoch=_set_epoch,
        key=tuple,
        transport=_json,
        stop_points=("middle", "last", "end"),
    )


def test_resume_stateful_dataloader(shards: list[str]) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> Any:
        return StatefulDataLoader(
            PrunedWebDataset(shards, CFG, seed=6).map(sample_key), batch_size=2, num_workers=2
        )

    run_resume_conformance(
        make,
        set_epoch=lambda dl, e: dl.dataset.set_epoch(e),
        key=tuple,
        stop_points=("start", "middle", "last", "edge", "end", 1),
    )


def test_state_mismatch_is_refused(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=3)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    for kwargs in (
        {"seed": 4},
        {"shuffle_shards": False},
        {"drop_last": True},
        {"world_size": 2, "rank": 0},
    ):
        with pytest.raises(StateDictError):
            PrunedWebDataset(shards, CFG, **{"seed": 3, **kwargs}).load_state_dict(state)
    with pytest.raises(StateDictError, match="config"):
        PrunedWebDataset(shards, CFG.replace(prune_ratio=0.7), seed=3).load_state_dict(state)
    with pytest.raises(StateDictError, match="index"):
        PrunedWebDataset(shards[:-1], CFG, seed=3).load_state_dict(state)
    with pytest.raises(StateDictError, match="format"):
        ds.load_state_dict({"epoch": 0})
    # a single-process state cannot resume a loader with two workers
    other = PrunedWebDataset(shards, CFG, seed=3)
    other.load_state_dict(state)
    with pytest.raises(StateDictError, match="num_workers"):
        keys_of(DataLoader(other.map(sample_key), batch_size=None, num_workers=2))


def test_state_for_another_epoch_warns_and_is_ignored(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=3)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    new = PrunedWebDataset(shards, CFG, seed=3)
    new.set_epoch(2)  # before loading: the state's epoch wins, as with PrunedSampler
    new.load_state_dict(state)
    assert new.epoch == 0 and len(list(new)) == new.num_samples - 1
    worker = PrunedWebDataset(shards, CFG, seed=3)
    worker._source._pending = state  # what load_state_dict does inside a DataLoader worker
    worker.set_epoch(2)
    with pytest.warns(RuntimeWarning, match="set_epoch"):
        assert len(list(worker)) == worker.num_samples


# --- real DDP -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, shards: list[str], out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = {}
        for name, cfg, workers, drop_last in (
            ("half", 0.5, 2, False),
            ("most", 0.0, 2, False),
            ("drop", 0.3, 2, True),
        ):
            ds = PrunedWebDataset(
                shards, CFG.replace(prune_ratio=cfg), seed=11, drop_last=drop_last
            )  # rank from the process group
            ds.set_epoch(1)
            # fork: a process started by spawn would spawn its workers too (slow imports)
            keys = keys_of(
                DataLoader(
                    ds.map(sample_key),
                    batch_size=3,
                    num_workers=workers,
                    multiprocessing_context="fork",
                )
            )
            gathered: list[Any] = [None] * world
            dist.all_gather_object(
                gathered,
                {"keys": keys, "rank": ds.state_dict()["rank"], "selected": selected_keys(ds)},
            )
            result[name] = gathered
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "ddp", [5, 4, 3], seed=9)  # 2 ranks x 2 workers > 3 shards
    out = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, _free_port(), shards, str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    for name, gathered in result.items():
        assert [g["rank"] for g in gathered] == [0, 1]
        sel = gathered[0]["selected"]
        keys = [g["keys"] for g in gathered]
        flat = [k for ks in keys for k in ks]
        assert len(keys[0]) == len(keys[1]) > 0, name  # equal per-rank counts
        assert set(flat) <= set(sel), name  # nothing unselected
        if name == "drop":
            assert len(flat) == len(set(flat)) == len(sel) // 2 * 2
        else:
            assert set(flat) == set(sel) and len(flat) == -(-len(sel) // 2) * 2, name
    assert torch.distributed.is_available()


# --- sample-level order per epoch (issue 9) -------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=7),
    data=st.data(),
    ranks=st.integers(1, 3),
    workers=st.integers(1, 4),
    window=st.integers(1, 3),
    block=st.integers(0, 5),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
)
def test_sample_window_order_is_a_split_of_one_permutation(
    counts: list[int],
    data: Any,
    ranks: int,
    workers: int,
    window: int,
    block: int,
    seed: int,
    epoch: int,
) -> None:
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    mask = data.draw(st.lists(st.booleans(), min_size=int(starts[-1]), max_size=int(starts[-1])))
    selected = np.flatnonzero(mask).astype(np.int64)
    plan = epoch_plan(
        selected,
        starts,
        seed=seed,
        epoch=epoch,
        shuffle_shards=True,
        world_size=ranks,
        drop_last=False,
        sample_window=window,
    )
    flat = epoch_plan(
        selected,
        starts,
        seed=seed,
        epoch=epoch,
        shuffle_shards=True,
        world_size=ranks,
        drop_last=False,
    )
    n = len(selected)
    seq = plan.positions(0, n)
    assert sorted(seq.tolist()) == selected.tolist()  # a permutation of the selection
    shard_of = np.searchsorted(starts, seq, side="right") - 1
    flat_shards = np.searchsorted(starts, flat.positions(0, n), side="right") - 1
    for a, b in itertools.pairwise(
        plan.window_bounds.tolist()
    ):  # windows: same shards as tar order
        assert sorted(shard_of[a:b].tolist()) == sorted(flat_shards[a:b].tolist())
        assert len(set(shard_of[a:b].tolist())) <= window
    for r in range(ranks):  # the worker count only cuts the same rank sequence
        whole = plan.positions(*plan.rank_span(r)).tolist()
        parts = [plan.positions(*plan.worker_span(r, w, workers)).tolist() for w in range(workers)]
        assert [x for part in parts for x in part] == whole
        lo, hi = plan.rank_span(r)
        cuts = plan.blocks(lo, hi, block)
        assert [x for a, b in cuts for x in range(a, b)] == list(range(hi - lo))
        for a, b in cuts:
            assert block == 0 or b - a <= block
            assert (
                len(
                    set(
                        np.searchsorted(
                            plan.window_bounds, np.arange(lo + a, lo + b) % n, side="right"
                        ).tolist()
                    )
                )
                == 1
            )  # never across a window
        sizes = np.random.default_rng(seed).integers(1, 100, hi - lo)
        cap = 250
        by_bytes = plan.blocks(lo, hi, block or 7, sizes=sizes, max_bytes=cap)
        assert [x for a, b in by_bytes for x in range(a, b)] == list(range(hi - lo))
        for a, b in by_bytes:  # count and byte caps, one oversized item alone
            assert b - a <= (block or 7) and (b - a == 1 or int(sizes[a:b].sum()) <= cap)
            wins = np.searchsorted(plan.window_bounds, np.arange(lo + a, lo + b) % n, side="right")
            assert len(set(wins.tolist())) == 1  # never across a window either


def test_new_sample_order_every_epoch_with_one_shard(tmp_path: Path) -> None:
    one = write_shards(tmp_path, [40])
    ds = PrunedWebDataset(one, PruneConfig(prune_ratio=0.0, entropy_filter="none"), seed=1)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append([s["__key__"] for s in ds])
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
    assert len({tuple(o) for o in orders}) == 3  # shard order alone could not change it
    again = PrunedWebDataset(one, PruneConfig(prune_ratio=0.0, entropy_filter="none"), seed=1)
    again.set_epoch(1)
    assert [s["__key__"] for s in again] == orders[1]  # seeded by (seed, epoch)
    flat = PrunedWebDataset(
        one, PruneConfig(prune_ratio=0.0, entropy_filter="none"), sample_window=0
    )
    assert [s["__key__"] for s in flat] == sorted(orders[0])  # tar order when turned off


def test_sample_order_reads_sorted_coalesced_blocks(
    shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rsprune_data.wds as wmod

    calls: list[list[int]] = []  # the offsets of each shard's piece of each read
    real = wmod.read_pieces

    def spy(pieces: Any, *args: Any, **kw: Any) -> Any:
        calls.extend(list(p.offsets) for p in pieces)
        return real(pieces, *args, **kw)

    monkeypatch.setattr(wmod, "read_pieces", spy)
    ds = PrunedWebDataset(shards, CFG, seed=2, sample_window=3)
    got = [s["__key__"] for s in ds]
    assert sorted(got) == sorted(selected_keys(ds))
    for offsets in calls:  # each call reads one shard's part of a block in file order
        assert offsets == sorted(offsets)
    assert len(calls) <= len(shards) * 2  # about one call per shard and window, not per sample


def test_read_blocks_are_capped_in_bytes(
    shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block holds at most _READ_BLOCK_BYTES (one item when larger); the order is unchanged."""
    import rsprune_data.wds as wmod

    ref = [s["__key__"] for s in PrunedWebDataset(shards, CFG, seed=4)]
    sizes: list[int] = []  # samples per read
    real = wmod.read_pieces

    def spy(pieces: Any, *a: Any, **k: Any) -> Any:
        sizes.append(sum(len(p.offsets) for p in pieces))
        return real(pieces, *a, **k)

    monkeypatch.setattr(wmod, "read_pieces", spy)
    monkeypatch.setattr(wmod, "_READ_BLOCK_BYTES", 1)
    assert [s["__key__"] for s in PrunedWebDataset(shards, CFG, seed=4)] == ref
    assert sizes and set(sizes) == {1}  # every sample is larger than 1 byte: blocks of one


# --- StatefulDataLoader through .batched(n), .shuffle(n), epoch restore (issue 9) ----------------


def test_batched_yields_without_look_ahead(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=6, shuffle_shards=False)
    it = iter(ds.map(sample_key).batched(3, collation_fn=None))
    first = next(it)
    assert len(first) == 3
    assert ds.state_dict()["consumed"] == 3  # webdataset's batched would have pulled a 4th


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_stateful_dataloader_batched(shards: list[str], num_workers: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> Any:
        pipeline = (
            PrunedWebDataset(shards, CFG, seed=6).map(sample_key).batched(2, collation_fn=None)
        )
        return StatefulDataLoader(pipeline, batch_size=None, num_workers=num_workers)

    report = run_resume_conformance(
        make,
        set_epoch=lambda dl, e: dl.dataset.set_epoch(e),
        key=tuple,
        stop_points=("start", "middle", "last", "edge", "end", 1),
    )
    assert len(report.checked) == 12


def test_stateful_dataloader_state_restores_its_epoch(shards: list[str]) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> Any:
        pipeline = (
            PrunedWebDataset(shards, CFG, seed=4).map(sample_key).batched(2, collation_fn=None)
        )
        return StatefulDataLoader(pipeline, batch_size=None, num_workers=2)

    ref = make()
    ref.dataset.set_epoch(1)
    want = [tuple(b) for b in ref]
    run = make()
    run.dataset.set_epoch(1)
    it = iter(run)
    head = [tuple(next(it)) for _ in range(3)]
    state = run.state_dict()
    fresh = make()  # no set_epoch: the loaded state's epoch (1) is the one continued
    fresh.load_state_dict(state)
    assert head + [tuple(b) for b in fresh] == want


def test_state_behind_a_shuffle_buffer_is_refused(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=4)
    pipeline = ds.shuffle(8).map(sample_key)
    it = iter(pipeline)
    next(it)
    state = pipeline.state_dict()
    assert state["buffered"] == 8
    with pytest.raises(StateDictError, match=r"\.shuffle\(8\).*sample-level order"):
        PrunedWebDataset(shards, CFG, seed=4).load_state_dict(state)


def test_a_second_pass_without_set_epoch_warns_once(shards: list[str]) -> None:
    ds = PrunedWebDataset(shards, CFG, seed=4)
    first = [s["__key__"] for s in ds]
    with pytest.warns(RuntimeWarning, match="without set_epoch"):
        assert [s["__key__"] for s in ds] == first
    ds.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(s["__key__"] for s in ds) == sorted(first)


REPEAT_WITHOUT_SET_EPOCH = """
import json, sys
from torch.utils.data import DataLoader
from rsprune_data import PruneConfig, PrunedWebDataset
ds = PrunedWebDataset(json.loads(sys.argv[1]), PruneConfig(prune_ratio=0.5, entropy_filter="none"))
loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=len)  # new workers every pass
for epoch in range(2):  # what Lightning does to an IterableDataset: never set_epoch
    print(epoch, sum(loader), file=sys.stderr, flush=True)
ds.set_epoch(1)
print("set", sum(loader), file=sys.stderr, flush=True)
"""


def test_repeated_epoch_warns_with_fresh_workers(shards: list[str]) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", REPEAT_WITHOUT_SET_EPOCH, json.dumps(shards)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = proc.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("0 "))
    second = next(i for i, line in enumerate(lines) if line.startswith("1 "))
    after = next(i for i, line in enumerate(lines) if line.startswith("set "))
    warned = [i for i, line in enumerate(lines) if "iterated again at epoch 0 without" in line]
    assert warned and all(
        first < i < second for i in warned
    )  # raised in the second epoch's workers
    assert not any(i > after for i in warned) and len(lines) - after == 1


def test_patterns_are_expanded_once_for_the_workers(tmp_path: Path) -> None:
    """A worker that reloads the index (spawn, or any unpickling) reads the shards the dataset
    was built on, not what the pattern matches by then; changed indexes are refused."""
    import pickle
    import shutil

    made = write_shards(tmp_path / "b", [5, 6, 7])
    aside = tmp_path / "later.tar"
    shutil.move(made[2], aside)
    ds = PrunedWebDataset(str(tmp_path / "b" / "*.tar"), CFG, shuffle_shards=False)
    assert ds.index.shards == made[:2]
    shutil.move(aside, made[2])  # a shard that matches the pattern appears
    again = pickle.loads(pickle.dumps(ds))
    assert again.index.shards == made[:2]
    assert sorted(s["__key__"] for s in again) == sorted(s["__key__"] for s in ds)
    other = write_shards(tmp_path / "c", [5, 9])  # shard 1 replaced, with its index
    for f in (other[1], str(idx.index_path_for(other[1]))):
        shutil.copy(f, tmp_path / "b" / Path(f).name)
    with pytest.raises(StaleIndexError, match="changed after the dataset was built"):
        _ = pickle.loads(pickle.dumps(ds)).index
