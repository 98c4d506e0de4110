"""The reading stages alone: runs, samples cut from run buffers, local reads with fadvise, options."""

from __future__ import annotations

import io
import itertools
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from rsprune_data import ConfigError, PruneConfig, StaleIndexError
from rsprune_data.errors import ShardError, ShardNotFoundError
from rsprune_data.reading import (
    LocalFile,
    ReadOptions,
    RetryPolicy,
    coalesce,
    cut_runs,
    read_samples,
    shard_kind,
)
from rsprune_data.tario import iter_tar_samples, scan_tar


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 400)), max_size=40),
    st.integers(0, 600),
    st.integers(1, 2000),
)
def test_coalesce_covers_every_range_within_caps(
    spans: list[tuple[int, int]], gap: int, block: int
) -> None:
    spans.sort()
    off = np.array([o for o, _ in spans], np.int64)
    ln = np.array([n for _, n in spans], np.int64)
    runs = coalesce(off, ln, max_gap=gap, max_block=block)
    b = runs.bounds.tolist()
    assert b[0] == 0 and b[-1] == len(spans) and all(x < y for x, y in itertools.pairwise(b))
    for r in range(len(runs)):
        s, e = int(runs.start[r]), int(runs.stop[r])
        inside = spans[b[r] : b[r + 1]]
        assert all(s <= o and o + n <= e for o, n in inside)  # every range inside its run
        assert e == max(o + n for o, n in inside) and s == inside[0][0]  # nothing read around
        assert (
            e - s <= block
            or len(inside) == 1
            or max(n for _, n in inside) > block
            or _needs(inside, block)
        )
    for r in range(len(runs) - 1):  # a run ends only at a gap wider than max_gap or the cap
        nxt = spans[b[r + 1]][0]
        assert (
            nxt - int(runs.stop[r]) > gap
            or int(runs.stop[r + 1]) - int(runs.start[r]) > block
            or _needs(spans[b[r] : b[r + 2]], block)
        )


def _needs(spans: list[tuple[int, int]], block: int) -> bool:
    return max(o + n for o, n in spans) - spans[0][0] > block


def test_coalesce_examples_and_errors() -> None:
    r = coalesce(
        np.array([0, 512, 512, 10_000]), np.array([512, 100, 512, 10]), max_gap=0, max_block=1 << 20
    )
    assert r.start.tolist() == [0, 10_000] and r.stop.tolist() == [1024, 10_010]
    assert r.bounds.tolist() == [0, 3, 4] and r.nbytes == 1034
    capped = coalesce(np.array([0, 100, 200]), np.array([100, 100, 100]), max_gap=0, max_block=150)
    assert capped.bounds.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="file order"):
        coalesce(np.array([5, 0]), np.array([1, 1]), max_gap=0, max_block=10)
    with pytest.raises(ConfigError, match="max_gap"):
        coalesce(np.array([0]), np.array([1]), max_gap=-1, max_block=10)
    assert len(coalesce(np.zeros(0, np.int64), np.zeros(0, np.int64), max_gap=0, max_block=1)) == 0


def _odd_shard(path: Path) -> None:
    """Plain members, GNU long names, upper-case extensions, pax paths and float mtimes."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("a/k0.jpg", b"x" * 700)
        add("a/k0.cls.txt", b"0")
        add("b/" + "long" * 40 + ".jpg", b"y" * 513)  # GNU long name
        add("b/" + "long" * 40 + ".txt", b"")
        add("c/k2.JPG", b"z" * 512)  # upper-case extension
        add("d/k3.png", b"p" * 1)
    with tarfile.open(path.with_name("pax.tar"), "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("e/ü" * 30 + ".jpg", "e/k4.jpg", "e/k4.cls"):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 3, 1.5
            tf.addfile(info, io.BytesIO(b"abc"))


@pytest.mark.parametrize("name", ["gnu.tar", "pax.tar"])
def test_cut_runs_equals_webdataset(tmp_path: Path, name: str) -> None:
    _odd_shard(tmp_path / "gnu.tar")
    path = tmp_path / name
    ts = scan_tar(path)
    want = [(s.key, d) for s, d in iter_tar_samples(path)]
    plain = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.WebDataset(str(path), shardshuffle=False)
    ]
    assert want == plain
    offs, lens = [t.offset for t in ts], [t.length for t in ts]
    for gap in (0, 10**6):
        runs = coalesce(np.array(offs), np.array(lens), max_gap=gap, max_block=1 << 20)
        with LocalFile(str(path)) as f:
            got = list(
                cut_runs(f.read_runs(runs), runs, offs, lens, [t.key for t in ts], str(path))
            )
        assert got == want


def test_cut_refuses_a_stale_index(tmp_path: Path) -> None:
    _odd_shard(tmp_path / "gnu.tar")
    path = str(tmp_path / "gnu.tar")
    ts = scan_tar(path)
    o, n = [ts[1].offset], [ts[1].length]
    with pytest.raises(StaleIndexError, match="the index says 'other'"):
        list(read_samples(path, [1], o, n, ["other"], ReadOptions()))
    with pytest.raises(ShardError, match="more than one sample"):  # a range over two samples
        list(
            read_samples(
                path, [0], [ts[0].offset], [ts[0].length + ts[1].length], [None], ReadOptions()
            )
        )
    with pytest.raises(ShardError, match="changed since indexing"):  # past the end of the file
        list(read_samples(path, [0], [os.path.getsize(path) - 512], [4096], [None], ReadOptions()))
    with pytest.raises(ShardNotFoundError, match="cannot open shard"):
        list(read_samples(str(tmp_path / "gone.tar"), [0], [0], [512], [None], ReadOptions()))


def test_planned_readahead_advises_exactly_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 16))
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    runs = coalesce(
        np.array([0, 5000, 40000]), np.array([100, 100, 8]), max_gap=0, max_block=1 << 20
    )
    with LocalFile(str(path), prefetch=1) as f:
        bufs = list(f.read_runs(runs))
    data = path.read_bytes()
    assert bufs == [data[0:100], data[5000:5100], data[40000:40008]]
    assert calls[0] == (0, 0, os.POSIX_FADV_RANDOM)  # kernel readahead off for this descriptor
    assert sorted(c[:2] for c in calls[1:]) == [(0, 100), (5000, 100), (40000, 8)]
    assert all(c[2] == os.POSIX_FADV_WILLNEED for c in calls[1:])
    calls.clear()
    with LocalFile(str(path), readahead="kernel") as f:
        assert list(f.read_runs(runs)) == bufs
    assert calls == []


def test_direct_reads_are_exact_and_aligned(tmp_path: Path) -> None:
    """``readahead="direct"``: O_DIRECT in aligned blocks, the same bytes as a plain read."""
    import warnings

    path = tmp_path / "f.bin"
    data = os.urandom(300_000)
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = LocalFile(str(path), readahead="direct", prefetch=4)
    with f:
        if not f.direct:  # tmpfs and friends: a warning, then the page cache
            assert any("O_DIRECT" in str(w.message) for w in caught)
        rng = np.random.default_rng(0)
        for _ in range(100):
            a = int(rng.integers(0, len(data)))
            b = min(len(data), a + int(rng.integers(0, 20_000)))
            assert f.read(a, b) == data[a:b]
        starts = np.sort(rng.choice(len(data) - 5000, 60, replace=False))
        runs = coalesce(starts, rng.integers(1, 5000, 60), max_gap=0, max_block=1 << 20)
        got = list(f.read_runs(runs))
        assert got == [
            data[a:b] for a, b in zip(runs.start.tolist(), runs.stop.tolist(), strict=True)
        ]
        gen = f.read_runs(runs)  # abandoned early: the reads in flight finish before close
        next(gen)
        gen.close()
        with pytest.raises(ShardError, match="changed since indexing"):
            f.read(len(data) - 10, len(data) + 10)


def test_direct_falls_back_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rsprune_data.reading.local as local

    monkeypatch.setattr(local, "_DIRECT", False)
    monkeypatch.setattr(local, "_warned_no_direct", set())
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 5000)
    with pytest.warns(UserWarning, match="no O_DIRECT.*readahead='planned'"):
        f = LocalFile(str(path), readahead="direct")
    with f:
        assert not f.direct and f.planned and f.read(10, 20) == b"x" * 10


def test_direct_delivers_what_planned_delivers(tmp_path: Path) -> None:
    from test_wds import CFG, write_shards

    from rsprune_data import PrunedShardDataset, PrunedWebDataset, PruneIndex

    shards = write_shards(tmp_path / "s", [9, 4, 11], seed=2)
    ref = [(s["__key__"], s["jpg"]) for s in PrunedWebDataset(shards, CFG, seed=1)]
    opts = ReadOptions(readahead="direct")
    got = [(s["__key__"], s["jpg"]) for s in PrunedWebDataset(shards, CFG, seed=1, read=opts)]
    assert got == ref and ref
    index = PruneIndex.load(shards)
    ds = PrunedShardDataset(index, read=opts)
    sel = index.select(CFG).tolist()
    assert [s["__key__"] for s in ds.__getitems__(sel)] == [index.keys[i] for i in sel]


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="readahead"):
        ReadOptions(readahead="lots")
    with pytest.raises(ConfigError, match="`retry` must be a RetryPolicy"):
        ReadOptions(retry=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="storage_options"):
        ReadOptions(storage_options="anon")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="backoff must be a number"):
        RetryPolicy(backoff="1")  # type: ignore[arg-type]
    assert RetryPolicy(attempts=2000, backoff=0.1).wait(1100) == 5.0  # no overflow
    from rsprune_data.reading import read_options

    with pytest.raises(ConfigError, match="`read` must be a ReadOptions"):
        read_options({"concurrency": 8})
    with pytest.raises(ConfigError, match="concurrency"):
        ReadOptions(concurrency=0)
    with pytest.raises(ConfigError, match="attempts"):
        RetryPolicy(attempts=0)
    assert [
        shard_kind(s)
        for s in ("a.tar", "file:///a.tar", "pipe:cat a", "s3://b/a.tar", "https://h/a.tar")
    ] == ["local", "local", "stream", "remote", "remote"]
    import pickle

    opts = ReadOptions(storage_options={"anon": True})
    assert pickle.loads(pickle.dumps(opts)) == opts


def test_map_style_batches_read_with_coalesced_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_wds import write_shards
    from torch.utils.data import DataLoader

    import rsprune_data.reading.local as local
    from rsprune_data import PrunedShardDataset, PruneIndex

    shards = write_shards(tmp_path, [12, 9])
    index = PruneIndex.load(shards)
    ds = PrunedShardDataset(index)
    order = [20, 3, 4, 5, 0, 13, 12, 4]
    single = [ds[i] for i in order]
    preads: list[tuple[int, int]] = []
    real = local.LocalFile.read_into

    def spy(self: local.LocalFile, runs: Any, out: memoryview) -> None:
        starts, stops = runs.start.tolist(), runs.stop.tolist()
        preads.extend((a, b - a) for a, b in zip(starts, stops, strict=True))
        real(self, runs, out)

    monkeypatch.setattr(local.LocalFile, "read_into", spy)
    batch = ds.__getitems__(order)
    assert batch == single  # same samples, asked order, the repeated 4 twice
    assert len(preads) == 4  # shard 0: {0}, {3, 4, 5} touching; shard 1: {12, 13}, {20}
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list)
    keys = [s["__key__"] for b in loader for s in b]
    assert keys == [ds[i]["__key__"] for i in range(len(ds))]


# --- one read for many pieces: the arena, the repeated-layout walk, cached reads (issue 11) ---


def _layout_shard(path: Path) -> None:
    """Samples whose member layouts change along the shard (what the repeated-layout walk must
    notice): two members, then three, a pax header per member, a dotted folder, a long name."""
    with wds.TarWriter(str(path)) as tw:  # pax headers: TarWriter's float mtimes
        for i in range(6):
            tw.write({"__key__": f"v1.0/a{i:02d}", "jpg": bytes([i]) * (700 + i), "cls": b"1"})
        for i in range(6, 10):
            tw.write({"__key__": f"v1.0/a{i:02d}", "jpg": b"j" * 3, "cls": b"2", "json": b"{}"})
        tw.write({"__key__": "b/" + "n" * 120, "jpg": b"long"})  # GNU long name / pax path
        for i in range(11, 14):
            tw.write({"__key__": f"c{i}", "cls": b"3", "jpg": b"x" * i})  # other member order
        for n in (95, 96, 97):  # member names of 99, 100 (no NUL in the field) and 101 bytes
            for tag in "xy":  # twice each: the second repeats the first's layout
                tw.write({"__key__": "d/" + "k" * (n - 3) + tag, "jpg": tag.encode(), "cls": b"4"})


@pytest.mark.parametrize("name", ["gnu.tar", "pax.tar", "layouts.tar"])
def test_read_pieces_equals_webdataset_for_any_subset(tmp_path: Path, name: str) -> None:
    from rsprune_data.reading import Piece, read_pieces
    from rsprune_data.tario import scan_tar

    _odd_shard(tmp_path / "gnu.tar")
    _layout_shard(tmp_path / "layouts.tar")
    path = str(tmp_path / name)
    plain = list(wds.WebDataset(path, shardshuffle=False))
    ts = scan_tar(path)
    assert [t.key for t in ts] == [s["__key__"] for s in plain]
    rng = np.random.default_rng(0)
    for keep in ([True] * len(ts), rng.random(len(ts)) < 0.5, rng.random(len(ts)) < 0.3):
        idx = [i for i, k in enumerate(keep) if k]
        half = len(idx) // 2  # two pieces of one shard in one read, and a read with opened
        pieces = [
            Piece(
                path,
                [ts[i].offset for i in part],
                [ts[i].length for i in part],
                [ts[i].key for i in part],
                numbers=part,
            )
            for part in (idx[:half], idx[half:])
        ]
        got = read_pieces(pieces, ReadOptions(), local_paths=True)
        want = [
            [{**plain[i], "__local_path__": path} for i in part]
            for part in (idx[:half], idx[half:])
        ]
        assert [[dict(s) for s in p] for p in got] == [[dict(s) for s in p] for p in want]
        assert all(
            type(v) is bytes for p in got for s in p for k, v in s.items() if not k.startswith("__")
        )
        # keys unknown to the index: read from the headers
        blind = [Piece(p.shard, p.offsets, p.lengths, [None] * len(p.offsets)) for p in pieces]
        again = read_pieces(blind, ReadOptions())
        assert [[s["__key__"] for s in p] for p in again] == [
            [plain[i]["__key__"] for i in part] for part in (idx[:half], idx[half:])
        ]


def test_read_pieces_results_survive_the_next_read(tmp_path: Path) -> None:
    """Members are copies: the next read reuses the thread's arena and must not change them."""
    from rsprune_data.reading import Piece, read_pieces

    _layout_shard(tmp_path / "layouts.tar")
    path = str(tmp_path / "layouts.tar")
    ts = scan_tar(path)
    first = read_pieces(
        [
            Piece(
                path,
                [t.offset for t in ts[:5]],
                [t.length for t in ts[:5]],
                [t.key for t in ts[:5]],
            )
        ],
        ReadOptions(),
    )
    snapshot = [dict(s) for s in first[0]]
    read_pieces(
        [
            Piece(
                path,
                [t.offset for t in ts[5:]],
                [t.length for t in ts[5:]],
                [t.key for t in ts[5:]],
            )
        ],
        ReadOptions(),
    )
    assert first[0] == snapshot


def test_repeated_layout_walk_refuses_a_changed_member(tmp_path: Path) -> None:
    """A sample that looks like its neighbour but is not (another key in one member's header,
    bytes changed without a checksum) still fails by name, not as a silent substitution."""
    from rsprune_data.reading import Piece, read_pieces

    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as tw:
        for i in range(4):
            tw.write({"__key__": f"k{i}", "jpg": b"a" * 600, "cls": b"1"})
    ts = scan_tar(str(path))
    raw = bytearray(path.read_bytes())
    at = raw.find(b"k2.cls")
    raw[at : at + 2] = b"k9"  # sample 2's second member now names another key
    path.write_bytes(bytes(raw))
    piece = Piece(str(path), [t.offset for t in ts], [t.length for t in ts], [t.key for t in ts])
    with pytest.raises(ShardError, match=r"k9|more than one sample|corrupt"):
        read_pieces([piece], ReadOptions())


def test_plain_keys() -> None:
    from rsprune_data.reading.samples import plain_keys

    assert plain_keys(["a/b", "c", "v1.0/d", "x/_y"])
    for odd in (["a/b.c"], ["_x"], ["a/"], [""], ["a", ""], ["a", None], ["a", "_b"], []):
        assert not plain_keys(odd), odd


def test_cached_reads_skip_the_announcement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm runs are read with RWF_NOWAIT and need no WILLNEED; a run that is not cached, or a
    file system without RWF_NOWAIT, falls back to announcing, with the same bytes."""
    import rsprune_data.reading.local as local
    from rsprune_data.reading.runs import Runs

    path = tmp_path / "f.bin"
    data = os.urandom(64 * 1024)
    path.write_bytes(data)
    runs = Runs(np.array([0, 8192, 40960]), np.array([100, 9000, 41000]), np.array([0, 1, 2, 3]))
    want = data[0:100] + data[8192:9000] + data[40960:41000]
    advised: list[int] = []
    real = os.posix_fadvise

    def spy(fd: int, off: int, n: int, how: int) -> None:
        if how == os.POSIX_FADV_WILLNEED:
            advised.append(off)
        real(fd, off, n, how)

    monkeypatch.setattr(local.os, "posix_fadvise", spy)
    out = bytearray(runs.nbytes)
    with LocalFile(str(path)) as f:
        assert f.nowait == (local._NOWAIT != 0)
        f.read_into(runs, memoryview(out))
    assert bytes(out) == want
    if local._NOWAIT:
        assert advised == []  # the file was just written: every run is cached
    real_preadv = os.preadv

    def no_nowait(fd: int, bufs: Any, off: int, flags: int = 0) -> int:
        if flags:
            raise OSError(95, "Operation not supported")
        return real_preadv(fd, bufs, off)

    monkeypatch.setattr(local.os, "preadv", no_nowait)
    out = bytearray(runs.nbytes)
    with LocalFile(str(path)) as f:
        f.read_into(runs, memoryview(out))
        assert not f.nowait or not local._NOWAIT
    assert bytes(out) == want and advised == [0, 8192, 40960]


# --- the member layout recorded by the indexer (rsprune_data.layout) ---


def _indexed_all_valid(path: str) -> None:
    """Index ``path`` with the indexer, then mark every sample valid (its members are not
    images), keeping everything else of the file, the member layout included."""
    from rsprune_data import index as idx
    from rsprune_data.indexer import index_shards

    index_shards([path], workers=0, progress=False)
    arrays, meta = idx.read_index(idx.index_path_for(path))
    assert "member_bounds" in arrays and idx.EXTS_KEY in meta
    n = len(arrays["valid"])
    arrays = {**arrays, "valid": np.ones(n, np.uint8), "reason": np.zeros(n, np.uint8)}
    idx.write_index(idx.index_path_for(path), arrays, {**meta, "reasons": "[]"})


@pytest.mark.parametrize("name", ["gnu.tar", "pax.tar", "layouts.tar", "plain.tar"])
def test_indexed_layout_cuts_verified_samples_without_their_headers(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both loaders cut a verified sample from the layout its index records and deliver what
    webdataset does; without verification (or without a layout) the headers are walked."""
    from rsprune_data import PruneConfig, PrunedShardDataset, PrunedWebDataset, PruneIndex
    from rsprune_data.reading import samples

    _odd_shard(tmp_path / "gnu.tar")
    _layout_shard(tmp_path / "layouts.tar")
    with wds.TarWriter(str(tmp_path / "plain.tar")) as tw:  # a pax header before every member
        for i in range(40):
            tw.write({"__key__": f"p/{i:03d}", "jpg": bytes([i]) * (900 + 37 * i), "cls": b"1"})
    path = str(tmp_path / name)
    _indexed_all_valid(path)
    want = [{**s, "__local_path__": path} for s in wds.WebDataset(path, shardshuffle=False)]
    walked: list[int] = []
    for fn in ("_walk_fast", "_walk_known", "_slow"):
        real = getattr(samples, fn)

        def spy(*args: Any, _real: Any = real) -> Any:
            walked.append(1)
            return _real(*args)

        monkeypatch.setattr(samples, fn, spy)
    index = PruneIndex.load([path])
    everything = PruneConfig(
        prune_ratio=0.0, entropy_filter="none", max_nodata=None, strategy="entropy"
    )
    for verify in (True, False):
        walked.clear()
        ds = PrunedWebDataset(index, everything, shuffle_shards=False, verify=verify)
        got = sorted((dict(s) for s in ds), key=lambda s: s["__key__"])
        assert got == sorted(want, key=lambda s: s["__key__"])
        odd = sum(  # names over 100 bytes: a GNU or pax header holds them, the sample is walked
            any(len(s["__key__"].encode()) + 1 + len(e) > 100 for e in s if not e.startswith("__"))
            for s in want
        )
        if verify:  # each odd sample: at most the repeated-layout walk, then the full one
            assert len(walked) <= 2 * odd and (odd > 0 or not walked)
        else:
            assert len(walked) >= len(want)
        walked.clear()
        mapped = PrunedShardDataset(index, verify=verify)
        batch = mapped.__getitems__(list(range(len(mapped))))  # a DataLoader batch: the layout
        assert bool(walked) == (not verify or odd > 0)
        singles = [mapped[i] for i in range(len(mapped))]  # ds[i]: one header walk each
        assert [{k: v for k, v in s.items() if k != "__local_path__"} for s in batch + singles] == [
            {k: v for k, v in s.items() if k != "__local_path__"} for s in want * 2
        ]


def test_layout_that_does_not_fit_its_samples_is_refused(tmp_path: Path) -> None:
    """``write_index`` refuses a layout that tar could not have written; a layout changed in the
    file afterwards (a flipped bit, a hand edit of any kind) no longer matches ``member_digest``
    and the index is refused when read, by both loaders."""
    from safetensors.numpy import save

    from rsprune_data import IndexCorruptError, PrunedShardDataset, PrunedWebDataset, PruneIndex
    from rsprune_data import index as idx

    _layout_shard(tmp_path / "layouts.tar")
    path = str(tmp_path / "layouts.tar")
    _indexed_all_valid(path)
    where = idx.index_path_for(path)
    arrays, meta = idx.read_index(where)
    assert PruneIndex.load([path]).members(0, np.arange(3)) is not None

    def changed(name: str, i: int, delta: int) -> dict[str, Any]:
        col = arrays[name].copy()
        col[i] += delta
        return {**arrays, name: col}

    refused = {
        "member_start": [changed("member_start", 1, 1), changed("member_start", 1, 1 << 20)],
        "member_s(tart|ize)": [changed("member_size", 1, 512)],  # a member ends past the sample
        "member_bounds": [{k: v for k, v in arrays.items() if k != "member_ext"}],  # half of one
    }
    for field, variants in refused.items():
        for bad in variants:
            with pytest.raises(ConfigError, match=field):
                idx.write_index(where, bad, meta)
    twice = arrays["member_ext"].copy()
    twice[1] = twice[0]
    with pytest.raises(ConfigError, match="member_ext"):
        idx.write_index(where, {**arrays, "member_ext": twice}, meta)
    with pytest.raises(ConfigError, match="member_exts"):
        idx.write_index(where, arrays, {**meta, idx.EXTS_KEY: '["jpg", "jpg", "cls"]'})
    # in the file: any edit of the layout (here: two members' extensions swapped, which fits)
    swapped = arrays["member_ext"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    for edit in ({**arrays, "member_ext": swapped}, changed("member_size", 0, -1)):
        raw = {k: np.ascontiguousarray(v) for k, v in edit.items()}
        where.write_bytes(save(raw, metadata=meta))
        with pytest.raises(IndexCorruptError, match="member_digest"):
            idx.read_index(where)
        everything = PruneConfig(
            prune_ratio=0.0, entropy_filter="none", max_nodata=None, strategy="entropy"
        )
        with pytest.raises(IndexCorruptError, match="member_digest"):
            list(PrunedWebDataset([path], everything, shuffle_shards=False))
        with pytest.raises(IndexCorruptError, match="member_digest"):
            PrunedShardDataset([path]).__getitems__([0, 1])


@pytest.mark.parametrize(
    "names",
    [
        ("v1.0/x", "v1"),  # the shifted key is a prefix up to a dot of a folder
        ("d" * 95 + "/k", "k"),  # ustar splits the long folder into the prefix field
    ],
)
def test_layout_cut_still_catches_a_shifted_key_column(
    tmp_path: Path, names: tuple[str, str]
) -> None:
    """The layout is used only where the first header names exactly the index's key: a key
    column rolled by one fails by name, as without the layout."""
    from rsprune_data import PrunedShardDataset, PrunedWebDataset, PruneIndex
    from rsprune_data import index as idx

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key in names:
            for ext, data in (("jpg", b"j" * 600), ("cls", b"7")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    _indexed_all_valid(str(path))
    arrays, meta = idx.read_index(idx.index_path_for(path))
    idx.write_index(idx.index_path_for(path), {**arrays, **idx.encode_keys(names[::-1])}, meta)
    assert list(PruneIndex.load([str(path)]).keys) == list(names[::-1])
    everything = PruneConfig(
        prune_ratio=0.0, entropy_filter="none", max_nodata=None, strategy="entropy"
    )
    with pytest.raises(StaleIndexError, match="but the index says"):
        list(PrunedWebDataset([str(path)], everything, shuffle_shards=False))
    with pytest.raises(StaleIndexError, match="but the index says"):
        PrunedShardDataset([str(path)]).__getitems__([0, 1])


def test_layout_of_an_index_that_changed_since_loading_is_not_used(tmp_path: Path) -> None:
    """The layout is read from the file on first use; a file whose ranges or checksums no
    longer match the loaded index gives no layout (the loaders walk the headers)."""
    from rsprune_data import PruneIndex
    from rsprune_data import index as idx

    _layout_shard(tmp_path / "layouts.tar")
    path = str(tmp_path / "layouts.tar")
    _indexed_all_valid(path)
    loaded = PruneIndex.load([path])
    arrays, meta = idx.read_index(idx.index_path_for(path))
    sums = arrays["checksum"].copy()
    sums[0] ^= 1
    idx.write_index(idx.index_path_for(path), {**arrays, "checksum": sums}, meta)
    assert loaded.members(0, np.arange(2)) is None
    assert PruneIndex.load([path]).members(0, np.arange(2)) is not None
