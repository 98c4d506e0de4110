"""Remote shards by byte range against real servers on 127.0.0.1: nginx, a faulty proxy, moto S3."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from servers import NGINX, FaultyProxy, LatencyProxy, Nginx, moto_s3
from test_wds import CFG, write_shards
from torch.utils.data import DataLoader

from rsprune_data import PruneConfig, PrunedShardDataset, PrunedWebDataset, PruneIndex
from rsprune_data import index as idx
from rsprune_data.indexer import index_shards
from rsprune_data.reading import (
    ReadOptions,
    RemoteFile,
    RemoteReadError,
    RetryPolicy,
    remote_metadata,
)
from rsprune_data.reading.runs import Runs

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx)"
)
COUNTS = [9, 4, 11, 6]
FAST_RETRY = RetryPolicy(attempts=8, backoff=0.0, max_backoff=0.0)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("remote") / "shards", COUNTS, seed=5)


@pytest.fixture(scope="module")
def index_dir(local: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local shards' index files, copied to a folder of their own (URLs need index_dir)."""
    out = tmp_path_factory.mktemp("idx")
    for s in local:
        shutil.copy(idx.index_path_for(s), out)
    return str(out)


@pytest.fixture(scope="module")
def nginx(local: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with Nginx(Path(local[0]).parent, tmp_path_factory.mktemp("nginx")) as server:
        yield server


def urls(base: str, local: list[str]) -> list[str]:
    return [f"{base}/{Path(s).name}" for s in local]


def delivered(ds: Any, workers: int = 0) -> list[dict[str, Any]]:
    if workers == 0:
        return list(ds)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return list(loader)


def strip(samples: list[dict[str, Any]]) -> list[tuple[str, bytes, bytes]]:
    return [(s["__key__"], s["jpg"], s["cls.txt"]) for s in samples]


@pytest.mark.parametrize("workers", [0, 2])
def test_http_delivers_exactly_what_local_delivers(
    local: list[str], index_dir: str, nginx: Nginx, workers: int
) -> None:
    ref = strip(delivered(PrunedWebDataset(local, CFG, seed=3), workers))
    ds = PrunedWebDataset(urls(nginx.url, local), CFG, index_dir=index_dir, seed=3)
    got = delivered(ds, workers)
    assert strip(got) == ref and len(ref) == ds.num_samples
    assert all(s["__url__"].startswith(nginx.url) for s in got)
    # the same bytes webdataset's own stream yields, key by key
    plain = {s["__key__"]: s for s in wds.WebDataset(local, shardshuffle=False)}
    assert all(plain[k]["jpg"] == j for k, j, _ in strip(got))


def test_http_two_ranks_cover_the_selection(local: list[str], index_dir: str, nginx: Nginx) -> None:
    parts = [
        strip(
            list(
                PrunedWebDataset(
                    urls(nginx.url, local),
                    CFG,
                    index_dir=index_dir,
                    rank=r,
                    world_size=2,
                    drop_last=True,
                )
            )
        )
        for r in range(2)
    ]
    ref = [
        strip(list(PrunedWebDataset(local, CFG, rank=r, world_size=2, drop_last=True)))
        for r in range(2)
    ]
    assert parts == ref and len(parts[0]) == len(parts[1])
    keys = [k for p in parts for k, _, _ in p]
    assert len(set(keys)) == len(keys)


def test_http_reads_only_the_selected_ranges(
    local: list[str], index_dir: str, nginx: Nginx
) -> None:
    nginx.reset_log()
    ds = PrunedWebDataset(
        urls(nginx.url, local), CFG, index_dir=index_dir, read=ReadOptions(remote_max_gap=0)
    )
    n = len(list(ds))
    requests, _ = nginx.bytes_sent()
    sel = ds.selected
    body = sum(int(line.split()[2]) for line in nginx.access_log.read_text().splitlines())
    assert n == len(sel) and 0 < requests <= n
    assert body == int(ds.index.lengths[sel].sum())  # max gap 0: exactly the selected bytes


def test_flaky_server_delivers_exactly(local: list[str], index_dir: str, nginx: Nginx) -> None:
    ref = strip(list(PrunedWebDataset(local, CFG, seed=1)))
    with FaultyProxy(f"127.0.0.1:{nginx.port}", fault_rate=0.3, seed=7) as proxy:
        ds = PrunedWebDataset(
            urls(proxy.url, local),
            CFG,
            index_dir=index_dir,
            seed=1,
            read=ReadOptions(retry=FAST_RETRY, remote_max_gap=0, concurrency=3),
        )
        assert strip(list(ds)) == ref
    assert min(proxy.counts[k] for k in ("503", "drop", "truncate")) >= 1  # every fault happened


def test_block_reads_share_one_bounded_window(
    local: list[str], index_dir: str, nginx: Nginx
) -> None:
    """The remote pieces of a read block go out together, within ``concurrency`` in all."""
    ref = strip(list(PrunedWebDataset(local, CFG, seed=2, sample_window=4)))
    with FaultyProxy(f"127.0.0.1:{nginx.port}", delay=0.05) as proxy:
        ds = PrunedWebDataset(
            urls(proxy.url, local),
            CFG,
            index_dir=index_dir,
            seed=2,
            sample_window=4,
            read=ReadOptions(remote_max_gap=0, concurrency=3),
        )
        assert strip(list(ds)) == ref
    assert proxy.max_in_flight == 3  # the window is full and never wider
    assert proxy.max_paths_in_flight >= 2  # several shards' ranges at once


def test_flaky_server_with_workers(local: list[str], index_dir: str, nginx: Nginx) -> None:
    ref = strip(delivered(PrunedWebDataset(local, CFG), 2))
    with FaultyProxy(f"127.0.0.1:{nginx.port}", fault_rate=0.25, seed=3) as proxy:
        ds = PrunedWebDataset(
            urls(proxy.url, local),
            CFG,
            index_dir=index_dir,
            read=ReadOptions(retry=FAST_RETRY, remote_max_gap=0),
        )
        assert strip(delivered(ds, 2)) == ref
    assert sum(proxy.counts[k] for k in ("503", "drop", "truncate")) >= 1


def test_dead_shard_fails_naming_the_url(local: list[str], index_dir: str, nginx: Nginx) -> None:
    name = Path(local[2]).name
    waits: list[float] = []
    with FaultyProxy(f"127.0.0.1:{nginx.port}", fail_paths=[f"/{name}"]) as proxy:
        ds = PrunedWebDataset(
            urls(proxy.url, local),
            PruneConfig(prune_ratio=0.0, entropy_filter="none"),
            index_dir=index_dir,
            shuffle_shards=False,
            sample_window=0,
            read=ReadOptions(retry=RetryPolicy(attempts=3, backoff=0.01)),
        )
        got: list[str] = []
        with pytest.raises(RemoteReadError, match=rf"{proxy.url}/{name}.*failed 3 time"):
            for s in ds:
                got.append(s["__key__"])
    # what came before the error is a prefix of the plan, never a gap (a read block that holds
    # the dead shard's samples fails whole, before any of its samples is handed out)
    before = list(ds.index.keys[: sum(COUNTS[:2])])
    assert got == before[: len(got)]
    policy = RetryPolicy(attempts=4, backoff=0.5, max_backoff=1.0)
    assert [policy.wait(a) for a in (1, 2, 3)] == [0.5, 1.0, 1.0]
    del waits


def test_retry_waits_with_backoff(local: list[str], nginx: Nginx) -> None:
    waits: list[float] = []
    name = Path(local[0]).name
    with FaultyProxy(f"127.0.0.1:{nginx.port}", fail_paths=[f"/{name}"]) as proxy:
        f = RemoteFile(
            f"{proxy.url}/{name}", retry=RetryPolicy(attempts=4, backoff=0.1), sleep=waits.append
        )
        with pytest.raises(RemoteReadError, match="503"):
            list(f.read_runs(Runs(np.array([0]), np.array([512]), np.array([0, 1]))))
    assert waits == [0.1, 0.2, 0.4]


def test_missing_object_is_not_retried(nginx: Nginx) -> None:
    waits: list[float] = []
    f = RemoteFile(f"{nginx.url}/nope.tar", sleep=waits.append)
    # the 404 ends the read at once ("cannot read", not "failed N time(s)"); a transient error of
    # the first connection on a loaded machine may come before it, so waits are not asserted empty
    with pytest.raises(RemoteReadError, match=r"cannot read .*nope\.tar.*FileNotFoundError"):
        f.fetch([0], [10])
    assert len(waits) < f.retry.attempts - 1


def test_map_style_over_http(local: list[str], index_dir: str, nginx: Nginx) -> None:
    from rsprune_data import PrunedSampler

    index = PruneIndex.load(urls(nginx.url, local), index_dir)
    ds = PrunedShardDataset(index)
    ref = PrunedShardDataset(PruneIndex.load(local))
    sampler = PrunedSampler(index, CFG, seed=0)
    loader = DataLoader(ds, sampler=sampler, batch_size=5, num_workers=2, collate_fn=list)
    got = [(s["__key__"], s["jpg"]) for batch in loader for s in batch]
    want = [(ref[i]["__key__"], ref[i]["jpg"]) for i in sampler]
    assert got == want and len(got) == len(sampler)


def test_remote_metadata_and_index_on_http(
    local: list[str], index_dir: str, nginx: Nginx, tmp_path: Path
) -> None:
    meta = remote_metadata(urls(nginx.url, local)[0])
    assert meta["shard_size"] == str(Path(local[0]).stat().st_size)
    assert meta["shard_fingerprint"].startswith("etag:")
    out = tmp_path / "idx"
    report = index_shards(urls(nginx.url, local), index_dir=out, workers=0, progress=False)
    assert report.ok and len(report.indexed) == len(local)
    for s in local:
        theirs, m = idx.read_index(out / (Path(s).name + idx.INDEX_SUFFIX))
        ours = idx.read_index(idx.index_path_for(s))[0]
        for k in ("offset", "length", "key_bytes", "key_offsets"):
            assert np.array_equal(theirs[k], ours[k])
        assert m["shard_fingerprint"].startswith("etag:")
    again = index_shards(urls(nginx.url, local), index_dir=out, workers=0, progress=False)
    assert len(again.skipped) == len(local)  # resume: current remote indexes are skipped


def test_s3_through_moto(local: list[str], index_dir: str, tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    ref = strip(list(PrunedWebDataset(local, CFG, seed=4)))
    with moto_s3("shards", [Path(s) for s in local]) as so:
        s3 = [f"s3://shards/{Path(s).name}" for s in local]
        ds = PrunedWebDataset(s3, CFG, index_dir=index_dir, seed=4, storage_options=so)
        assert strip(list(ds)) == ref
        meta = remote_metadata(s3[0], so)
        assert meta["shard_fingerprint"].startswith("etag:")
        report = index_shards(
            s3[:1], index_dir=tmp_path, workers=0, progress=False, storage_options=so
        )
        assert report.ok
        assert (
            json.loads(
                idx.read_metadata(tmp_path / (Path(local[0]).name + idx.INDEX_SUFFIX))["reasons"]
            )
            == []
        )


def test_cli_index_on_urls(
    local: list[str], nginx: Nginx, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rsprune_data.cli import main

    out = tmp_path / "cli-idx"
    assert (
        main(
            [
                "index",
                *urls(nginx.url, local),
                "--index-dir",
                str(out),
                "--workers",
                "0",
                "-q",
                "--storage-options",
                '{"block_size": 65536}',
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        Path(s).name + idx.INDEX_SUFFIX for s in local
    )
    assert (
        main(
            [
                "index",
                urls(nginx.url, local)[0],
                "--index-dir",
                str(out),
                "--storage-options",
                "[1]",
            ]
        )
        == 2
    )
    assert "--storage-options must be a JSON object" in capsys.readouterr().err
    assert (
        main(["index", f"pipe:curl -s {urls(nginx.url, local)[0]}", "--index-dir", str(out)]) == 2
    )


def test_latency_relay_delays_and_keeps_bytes(local: list[str], nginx: Nginx) -> None:
    """The benchmark's latency relay: every answer ``delay`` later, byte for byte."""
    import time

    import fsspec

    data = Path(local[0]).read_bytes()
    with LatencyProxy(f"127.0.0.1:{nginx.port}", 0.1) as relay:
        fs = fsspec.filesystem("http", skip_instance_cache=True)
        url = f"{relay.url}/{Path(local[0]).name}"
        t0 = time.perf_counter()
        assert fs.cat_file(url, start=512, end=2048) == data[512:2048]
        assert time.perf_counter() - t0 >= 0.1
        assert fs.cat_file(url) == data


def _collect_garbage(batch: list[Any]) -> list[Any]:
    import gc

    gc.collect()  # any GC pass in a forked worker used to close the parent's connections
    return batch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loader", ["map", "iterable"])
def test_main_process_reads_after_forked_workers(
    local: list[str], index_dir: str, nginx: Nginx, loader: str
) -> None:
    """A forked worker inherits the parent's fsspec session and event loop (whose epoll set the
    two processes share); nothing it does may stall the parent's next read."""
    index = PruneIndex.load(urls(nginx.url, local), index_dir)
    ds: Any = PrunedShardDataset(index) if loader == "map" else PrunedWebDataset(index, CFG)
    ref: Any = (PrunedShardDataset if loader == "map" else PrunedWebDataset)(
        PruneIndex.load(local), *([] if loader == "map" else [CFG])
    )
    want = strip(list(ref))

    def epoch(workers: int) -> list[tuple[str, bytes, bytes]]:
        if loader == "iterable":
            ds.set_epoch(0)  # the same order every pass
        collate = _collect_garbage if workers else list
        batches = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
        return strip([s for batch in batches for s in batch])

    assert epoch(0) == want  # the parent now holds a session with pooled keep-alive connections
    assert sorted(epoch(2)) == sorted(want)
    assert epoch(0) == want  # and its next read is not stalled by what the workers closed
