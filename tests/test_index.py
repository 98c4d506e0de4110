"""index: the per-shard safetensors file, atomic writes, staleness, and PruneIndex joins."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

import rsprune_data.index as idx
from rsprune_data.errors import (
    ConfigError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    StaleIndexError,
)
from rsprune_data.index import PruneIndex, index_path_for, read_index, read_metadata, write_index
from rsprune_data.integrity import range_checksums
from rsprune_data.tario import parse_sample, read_ranges, scan_tar


def make_shard(path: Path, n: int, tag: str = "s") -> Path:
    with wds.TarWriter(str(path), encoder=False) as w:
        for i in range(n):
            w.write({"__key__": f"{tag}/{i:04d}", "jpg": os.urandom(100 + i), "cls": b"%d" % i})
    return path


def index_shard(
    shard: Path,
    index_dir: Path | None = None,
    *,
    centroids: str = "c0",
    reasons: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """A plausible index of a real shard: scores random, offsets/keys from scan_tar."""
    samples = scan_tar(shard)
    n = len(samples)
    rng = np.random.default_rng(seed)
    reasons = [] if reasons is None else reasons
    arrays: dict[str, Any] = {
        "entropy": rng.uniform(0, 8, n),
        "nodata": np.zeros(n),
        "cluster_id": rng.integers(0, 4, n),
        "similarity": rng.uniform(0, 1, n),
        "valid": np.ones(n, bool),
        "reason": np.zeros(n, np.uint8),
        "offset": [s.offset for s in samples],
        "length": [s.length for s in samples],
        "checksum": range_checksums(str(shard), [(s.offset, s.length) for s in samples]),
        **idx.encode_keys([s.key for s in samples]),
    }
    if reasons and n:
        arrays["valid"][0], arrays["reason"][0], arrays["cluster_id"][0] = False, len(reasons), -1
    meta = {
        **idx.shard_metadata(shard),
        "encoder": "enc",
        "centroids_digest": centroids,
        "num_clusters": "4",
        "reasons": json.dumps(reasons),
    }
    out = index_path_for(shard, index_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_index(out, arrays, meta)
    return out


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    sizes = [5, 0, 7]  # an empty shard in the middle
    return [make_shard(tmp_path / f"shard-{i:02d}.tar", n, f"s{i}") for i, n in enumerate(sizes)]


def test_write_read_round_trip(tmp_path: Path) -> None:
    shard = make_shard(tmp_path / "a.tar", 6)
    path = index_shard(shard, reasons=["decode_error"])
    assert path == tmp_path / "a.tar.rsidx.safetensors"
    arrays, meta = read_index(path)
    assert meta == read_metadata(path)
    assert (meta["format"], meta["version"], meta["num_samples"]) == ("rsprune-index", "2", "6")
    assert meta["shard"] == "a.tar" and meta["shard_size"] == str(shard.stat().st_size)
    for name, dtype in {**idx.SAMPLE_TENSORS, **idx.KEY_TENSORS}.items():
        assert arrays[name].dtype == dtype, name
    assert arrays["cluster_id"][0] == -1 and arrays["reason"][0] == 1
    keys = idx.KeyList(arrays["key_bytes"], arrays["key_offsets"])
    assert list(keys) == [f"s/{i:04d}" for i in range(6)]
    # the byte ranges in the index read back exactly the samples webdataset yields
    ranges = list(zip(arrays["offset"].tolist(), arrays["length"].tolist(), strict=True))
    parsed = [parse_sample(b) for b in read_ranges(shard, ranges)]
    ref = [
        (s["__key__"], {"jpg": s["jpg"], "cls": s["cls"]})
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]
    assert parsed == ref


def test_write_index_validates(tmp_path: Path) -> None:
    shard = make_shard(tmp_path / "a.tar", 2)
    good = read_index(index_shard(shard))
    arrays, meta = dict(good[0]), dict(good[1])
    with pytest.raises(ConfigError, match="encoder"):
        write_index(tmp_path / "x", arrays, {k: v for k, v in meta.items() if k != "encoder"})
    with pytest.raises(ConfigError, match="similarity"):
        write_index(tmp_path / "x", {**arrays, "similarity": np.zeros(3)}, meta)
    with pytest.raises(ConfigError, match="cluster_id must be in"):
        write_index(tmp_path / "x", {**arrays, "cluster_id": np.array([0, 4])}, meta)
    with pytest.raises(ConfigError, match=r"\['cluster_id'\] do not fit \['int16'\]"):
        write_index(tmp_path / "x", {**arrays, "cluster_id": np.array([0, 65536])}, meta)
    assert not (tmp_path / "x").exists()


def test_atomic_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = make_shard(tmp_path / "a.tar", 3)
    path = index_shard(shard)
    before = path.read_bytes()
    arrays, meta = read_index(path)

    def boom(*_: Any) -> None:
        raise OSError("disk full")

    for target in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(idx.os, target, boom)
            with pytest.raises(OSError, match="disk full"):
                write_index(path, {**arrays, "entropy": arrays["entropy"] + 1}, meta)
        assert path.read_bytes() == before  # the old index is untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", path.name]
    leftover = tmp_path / f".{path.name}.999.tmp"  # what a killed process would leave
    leftover.write_bytes(b"partial")
    idx.remove_stale_temporaries(path)
    assert not leftover.exists() and path.exists()


def test_load_order_concat_and_lazy_keys(shards: list[Path]) -> None:
    for s in shards:
        index_shard(s)
    index = PruneIndex.load([shards[2], shards[0], shards[1]])
    assert len(index) == 12 and index.shards == [str(shards[2]), str(shards[0]), str(shards[1])]
    assert index.shard_starts.tolist() == [0, 7, 12, 12]
    assert index.shard_ids.tolist() == [0] * 7 + [1] * 5 and index.shard_ids.dtype == np.int32
    assert index._keys is None  # not read until asked for
    assert list(index.keys) == [f"s2/{i:04d}" for i in range(7)] + [f"s0/{i:04d}" for i in range(5)]
    assert index.keys[-1] == "s0/0004" and index.keys[7:9] == ["s0/0000", "s0/0001"]
    first = read_index(index_path_for(shards[2]))[0]
    assert np.array_equal(index.entropy[:7], first["entropy"])
    assert np.array_equal(index.offsets[:7], first["offset"])
    assert index.valid.dtype == bool and index.valid.all()
    assert (index.num_clusters, index.encoder, index.centroids_digest) == (4, "enc", "c0")
    assert index.fingerprint == PruneIndex.load([shards[2], shards[0], shards[1]]).fingerprint
    assert index.fingerprint != PruneIndex.load(shards).fingerprint
    for i in (0, 6, 7, 11):  # global position -> shard + byte range -> the right sample
        shard = index.shards[index.shard_ids[i]]
        key, _ = parse_sample(next(read_ranges(shard, [(index.offsets[i], index.lengths[i])])))
        assert key == index.keys[i]


def test_load_by_brace_pattern_and_index_paths(shards: list[Path], tmp_path: Path) -> None:
    for s in shards:
        index_shard(s)
    by_pattern = PruneIndex.load(str(tmp_path / "shard-{00..02}.tar"))
    by_index = PruneIndex.load([index_path_for(s) for s in shards])
    assert by_index.shards == by_pattern.shards == [str(s) for s in shards]
    assert by_index.fingerprint == by_pattern.fingerprint
    with pytest.raises(ConfigError, match="twice"):
        PruneIndex.load([shards[0], shards[0]])
    with pytest.raises(ConfigError, match="empty"):
        PruneIndex.load([])


def test_index_dir(shards: list[Path], tmp_path: Path) -> None:
    for s in shards:
        index_shard(s, tmp_path / "idx")
    assert (tmp_path / "idx" / "shard-00.tar.rsidx.safetensors").exists()
    assert len(PruneIndex.load(shards, index_dir=tmp_path / "idx")) == 12
    with pytest.raises(IndexNotFoundError, match=r"shard-00\.tar"):
        PruneIndex.load(shards)  # not beside the shards
    # remote shards: the index must come from index_dir and there is nothing to stat
    urls = [f"https://host/data/{s.name}" for s in shards]
    assert len(PruneIndex.load(urls, index_dir=tmp_path / "idx")) == 12
    piped = index_path_for(f"pipe:curl -s {urls[0]}", "d")
    assert piped == Path("d/shard-00.tar.rsidx.safetensors")
    with pytest.raises(ConfigError, match="index_dir"):
        index_path_for(urls[0])


def test_missing_index_names_shard_and_command(shards: list[Path]) -> None:
    index_shard(shards[0])
    with pytest.raises(IndexNotFoundError) as err:
        PruneIndex.load(shards[:2])
    msg = str(err.value)
    assert str(shards[1]) in msg and f"rsprune-data index {shards[1]}" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_stale_detection(tmp_path: Path) -> None:
    shard = make_shard(tmp_path / "a.tar", 4)
    index_shard(shard)
    PruneIndex.load([shard])
    os.utime(shard, ns=(1, 1))  # touched (or copied) but the same bytes: still current
    assert idx.shard_is_stale(shard, read_metadata(index_path_for(shard))) is None
    PruneIndex.load([shard])
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(raw))
    with pytest.raises(StaleIndexError, match=r"shard .*a\.tar changed.*rsprune-data index"):
        PruneIndex.load([shard])
    make_shard(shard, 5)  # rewritten with more samples
    with pytest.raises(StaleIndexError, match="changed size from"):
        PruneIndex.load([shard])
    assert len(PruneIndex.load([shard], check_stale=False)) == 4
    index_shard(shard)
    assert len(PruneIndex.load([shard])) == 5


def test_missing_local_shard(tmp_path: Path) -> None:
    shard = make_shard(tmp_path / "a.tar", 3)
    path = index_shard(shard)
    shard.unlink()
    with pytest.raises(StaleIndexError, match="does not exist"):
        PruneIndex.load([shard])
    with pytest.raises(StaleIndexError, match="does not exist"):
        PruneIndex.load([path])
    assert len(PruneIndex.load([path], check_stale=False)) == 3


def test_mismatched_indexes(shards: list[Path]) -> None:
    index_shard(shards[0])
    index_shard(shards[2], centroids="other")
    with pytest.raises(IndexMismatchError) as err:
        PruneIndex.load([shards[0], shards[2]])
    msg = str(err.value)
    assert str(shards[2]) in msg and "centroids_digest='other'" in msg and "--centroids" in msg


def test_wrong_version_and_unreadable_index(tmp_path: Path) -> None:
    shard = make_shard(tmp_path / "a.tar", 2)
    path = index_shard(shard)
    from safetensors.numpy import save_file

    arrays, meta = read_index(path)
    save_file(arrays, str(path), metadata={**meta, "version": "9"})
    with pytest.raises(IndexMismatchError, match="version '9'"):
        PruneIndex.load([shard])
    path.write_bytes(b"garbage")
    with pytest.raises(IndexCorruptError, match="unreadable"):
        PruneIndex.load([shard])


def test_reason_codes_are_joined(shards: list[Path]) -> None:
    index_shard(shards[0], reasons=["truncated"])
    index_shard(shards[2], reasons=["decode_error"])
    index = PruneIndex.load([shards[0], shards[2]])
    assert index.reasons == ["ok", "truncated", "decode_error"]
    assert [index.reasons[c] for c in index.reason[[0, 1, 5, 6]]] == [
        "truncated",
        "ok",
        "decode_error",
        "ok",
    ]
    assert index.valid.tolist().count(False) == 2


def test_from_arrays() -> None:
    z, s = [0, 1, -1, 1], [0.5, 0.6, 0.0, 0.9]
    index = PruneIndex.from_arrays(
        [1, 2, 3, 4],
        z,
        s,
        num_clusters=2,
        valid=[1, 1, 0, 1],
        shard_ids=[0, 0, 1, 1],
        keys=list("abcd"),
    )
    assert index.shards == ["<memory-0>", "<memory-1>"] and index.shard_starts.tolist() == [0, 2, 4]
    assert index.valid.tolist() == [True, True, False, True] and index.entropy.dtype == np.float32
    assert index.keys[2] == "c" and index.offsets.tolist() == [0, 0, 0, 0]
    same = PruneIndex.from_arrays(
        [1, 2, 3, 4], z, s, num_clusters=2, valid=[1, 1, 0, 1], shard_ids=[0, 0, 1, 1]
    )
    other = PruneIndex.from_arrays([1, 2, 3, 5], z, s, num_clusters=2)
    assert index.fingerprint == same.fingerprint != other.fingerprint
    with pytest.raises(ConfigError, match="cluster_ids"):
        PruneIndex.from_arrays([1.0], [2], [0.5], num_clusters=2)
    with pytest.raises(ConfigError, match="similarity"):
        PruneIndex.from_arrays([1.0, 2.0], [0, 0], [0.5], num_clusters=1)
    with pytest.raises(ConfigError, match="shard_ids"):
        PruneIndex.from_arrays([1.0, 2.0], [0, 0], [0.5, 0.5], num_clusters=1, shard_ids=[1, 0])


def test_select_and_summary_delegate(shards: list[Path]) -> None:
    from rsprune_data.config import PruneConfig
    from rsprune_data.plan import select_with_config

    for s in shards:
        index_shard(s)
    index = PruneIndex.load(shards)
    cfg = PruneConfig(prune_ratio=0.5)
    assert np.array_equal(index.select(cfg), select_with_config(index, cfg))
    assert isinstance(index.summary(cfg), dict)


def test_key_list_take_decodes_every_kind_of_key() -> None:
    """``take`` slices one decoded string for ASCII keys and decodes one by one otherwise
    (UTF-8, and bytes that are not UTF-8, kept with surrogateescape as tar names are)."""
    names = [b"a/0001", b"a/0002", "b/\u00e9t\u00e9".encode(), b"c/\xff\xfe", b"d", b""]
    data = np.frombuffer(b"".join(names), np.uint8)
    offsets = np.cumsum([0, *map(len, names)]).astype(np.int64)
    keys = idx.KeyList(data, offsets)
    want = [n.decode("utf-8", "surrogateescape") for n in names]
    assert list(keys) == want
    for pos in ([0, 1], [1, 0, 1], [2, 3], [0, 2, 5], [4], [5], []):
        assert keys.take(np.asarray(pos, np.int64)) == [want[i] for i in pos]


def test_indexer_records_the_member_layout_of_every_sample(tmp_path: Path) -> None:
    """The indexer keeps what its scan found: per sample, each member's extension, data start
    (relative to the sample) and size, in tar order; reassign-style rewrites keep it."""
    from rsprune_data.indexer import index_shards
    from rsprune_data.layout import layout_of

    shard = tmp_path / "a.tar"
    with wds.TarWriter(str(shard)) as tw:
        for i in range(7):
            extra = {"json": b"{}"} if i % 3 == 0 else {}
            tw.write({"__key__": f"s/{i:02d}", "jpg": b"j" * (10 + 600 * i), "cls": b"1", **extra})
    index_shards([str(shard)], workers=0, progress=False)
    arrays, meta = read_index(index_path_for(shard))
    layout = layout_of(arrays, meta, "a")
    assert layout is not None and layout.repeat == 0  # the members change along the shard
    want = scan_tar(shard)
    got = layout.take(np.arange(len(want)))
    for i, ts in enumerate(want):
        cut = got.cuts[got.bounds[i] : got.bounds[i + 1]]
        assert cut == [(e, a - ts.offset, a - ts.offset + n) for e, (a, n) in ts.members.items()]
    # the layout survives a rewrite of the index (what reassign does)
    write_index(index_path_for(shard), arrays, meta)
    again, meta2 = read_index(index_path_for(shard))
    assert all(np.array_equal(again[k], arrays[k]) for k in idx.MEMBER_TENSORS)
    assert meta2[idx.EXTS_KEY] == meta[idx.EXTS_KEY]
    # a shard whose samples repeat one layout is noticed as such
    plain = tmp_path / "b.tar"
    with wds.TarWriter(str(plain)) as tw:
        for i in range(5):
            tw.write({"__key__": f"t/{i}", "jpg": b"x" * i, "cls": b"2"})
    index_shards([str(plain)], workers=0, progress=False)
    layout = layout_of(*read_index(index_path_for(plain)), "b")
    order = list(scan_tar(plain)[0].members)  # tar order (TarWriter sorts the extensions)
    assert layout is not None and (layout.repeat, layout.pattern) == (2, order)
    assert layout.nbytes == 5 * 2 * 8  # int32 start and stop per member, nothing else
    taken = layout.take(np.array([1, 3]))
    assert taken.bounds == [0, 2, 4] and [c[0] for c in taken.cuts] == order * 2


def test_shard_patterns_expand_like_a_shell_and_webdataset(tmp_path: Path) -> None:
    """Braces as webdataset expands them, globs as a shell would (sorted); an existing name is
    literal, a URL is never globbed, a glob that matches nothing is an error naming it."""
    for i in (2, 0, 1):
        make_shard(tmp_path / f"p-{i}.tar", 3, tag=f"t{i}")
    odd = make_shard(tmp_path / "odd{x}.tar", 2, tag="odd")
    names = [str(tmp_path / f"p-{i}.tar") for i in range(3)]
    assert idx.expand_shards(str(tmp_path / "p-*.tar")) == names
    assert idx.expand_shards(str(tmp_path / "p-{0..2}.tar")) == names
    assert idx.expand_shards([str(tmp_path / "p-[12].tar"), str(odd)]) == [*names[1:], str(odd)]
    assert idx.expand_shards("https://h/s-{0..1}.tar") == ["https://h/s-0.tar", "https://h/s-1.tar"]
    assert idx.expand_shards(["https://h/*.tar"]) == ["https://h/*.tar"]
    with pytest.raises(ConfigError, match=r"pattern '.*q-\*\.tar' matches no file"):
        idx.expand_shards(str(tmp_path / "q-*.tar"))
    for s in names:
        index_shard(Path(s))
    loaded = PruneIndex.load(str(tmp_path / "p-*.tar"))
    assert loaded.shards == names and len(loaded) == 9
    assert idx.expand_shards(str(tmp_path / "p-*")) == names  # not the index files beside them
    with pytest.raises(IndexNotFoundError, match="the shard itself does not exist"):
        PruneIndex.load(str(tmp_path / "p-{7..8}.tar"))  # braces expand to files that are not there
    assert idx.expand_shards(f"file://{tmp_path}/p-*.tar") == [f"file://{n}" for n in names]
