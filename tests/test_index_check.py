"""Crafted index files (real safetensors written around the checks) are refused by name.

Each case damages one field of a real index of a real tar shard and checks that ``read_index``,
``PruneIndex.load``, both loaders and the CLI refuse it with one ``IndexCorruptError`` naming the
file and the field (exit 2 and no traceback for the CLI), never a numpy error or a wrong answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_index import index_shard, make_shard

from rsprune_data import IndexCorruptError, PrunedShardDataset, PrunedWebDataset, PruneIndex
from rsprune_data.cli import main as cli_main
from rsprune_data.errors import ConfigError
from rsprune_data.index import read_index, read_metadata, write_index

Arrays = dict[str, Any]
Meta = dict[str, str]
Damage = Callable[[Arrays, Meta], None]


def _set(name: str, value: Any) -> Damage:
    def damage(a: Arrays, m: Meta) -> None:
        a[name] = value(a[name]) if callable(value) else value

    return damage


def _meta(name: str, value: str | None) -> Damage:
    def damage(a: Arrays, m: Meta) -> None:
        if value is None:
            del m[name]
        else:
            m[name] = value

    return damage


def _drop(name: str) -> Damage:
    def damage(a: Arrays, m: Meta) -> None:
        del a[name]

    return damage


def _edit(name: str, i: int, value: Any) -> Damage:
    def damage(a: Arrays, m: Meta) -> None:
        a[name] = a[name].copy()
        a[name][i] = value

    return damage


# (case id, damage, field named in the error)
CASES: list[tuple[str, Damage, str]] = [
    ("short entropy", _set("entropy", lambda v: v[:-1]), "entropy"),
    ("long similarity", _set("similarity", lambda v: np.append(v, np.float32(0))), "similarity"),
    ("entropy float64", _set("entropy", lambda v: v.astype(np.float64)), "entropy"),
    ("valid int64", _set("valid", lambda v: v.astype(np.int64)), "valid"),
    ("offset int32", _set("offset", lambda v: v.astype(np.int32)), "offset"),
    ("offset 2-D", _set("offset", lambda v: v.reshape(1, -1)), "offset"),
    ("valid=2", _edit("valid", 1, 2), "valid"),
    ("reason past the list", _edit("reason", 2, 7), "reason"),
    ("invalid without reason", _edit("valid", 1, 0), "reason"),
    ("valid with a reason", _edit("reason", 3, 1), "reason"),
    ("entropy NaN", _edit("entropy", 0, np.nan), "entropy"),
    ("entropy 9 bits", _edit("entropy", 0, 9.0), "entropy"),
    ("nodata 1.5", _edit("nodata", 0, 1.5), "nodata"),
    ("similarity 3", _edit("similarity", 0, 3.0), "similarity"),
    ("similarity inf", _edit("similarity", 0, np.inf), "similarity"),
    ("cluster_id = K", _edit("cluster_id", 0, 4), "cluster_id"),
    ("cluster_id -2", _edit("cluster_id", 0, -2), "cluster_id"),
    ("offset negative", _edit("offset", 0, -512), "offset"),
    ("offset not monotone", _set("offset", lambda v: v[::-1].copy()), "offset"),
    ("overlapping ranges", _edit("offset", 1, 512), "offset"),
    ("length 0", _edit("length", 0, 0), "length"),
    ("range past the shard", _edit("length", -1, 10**9), "length"),
    ("missing offset tensor", _drop("offset"), "offset"),
    ("missing key_bytes tensor", _drop("key_bytes"), "key_bytes"),
    ("key_offsets short", _set("key_offsets", lambda v: v[:-1]), "key_offsets"),
    ("key_offsets not rising", _edit("key_offsets", 1, 0), "key_offsets"),
    ("key_offsets past key_bytes", _edit("key_offsets", -1, 10**6), "key_offsets"),
    ("no reasons", _meta("reasons", None), "reasons"),
    ("reasons not JSON", _meta("reasons", "[decode_error"), "reasons"),
    ("reasons not a list", _meta("reasons", '{"a": 1}'), "reasons"),
    ("reasons repeated", _meta("reasons", '["x", "x"]'), "reasons"),
    ("num_samples text", _meta("num_samples", "six"), "num_samples"),
    ("num_samples wrong", _meta("num_samples", "5"), "entropy"),
    ("num_clusters negative", _meta("num_clusters", "-1"), "num_clusters"),
    ("shard_size text", _meta("shard_size", "big"), "shard_size"),
    ("no encoder", _meta("encoder", None), "encoder"),
    ("no shard_fingerprint", _meta("shard_fingerprint", None), "shard_fingerprint"),
]


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path, Arrays, Meta]:
    shard = make_shard(tmp_path / "a.tar", 6)
    path = index_shard(shard, reasons=["decode_error"])
    arrays, meta = read_index(path)
    return shard, path, arrays, meta


def _write_raw(path: Path, arrays: Arrays, meta: Meta) -> None:
    """Write the file as safetensors, around write_index's own checks (what a damaged or
    hand-edited file, or another tool, gives)."""
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=meta)


@pytest.mark.parametrize(("case", "damage", "field"), CASES, ids=[c[0] for c in CASES])
def test_crafted_index_is_refused_by_name(
    good: tuple[Path, Path, Arrays, Meta], case: str, damage: Damage, field: str
) -> None:
    shard, path, arrays, meta = good
    a, m = dict(arrays), dict(meta)
    damage(a, m)
    _write_raw(path, a, m)
    for load in (lambda: read_index(path), lambda: PruneIndex.load([str(shard)]).keys):
        with pytest.raises(IndexCorruptError) as err:
            load()
        msg = str(err.value)
        assert str(path) in msg and repr(field) in msg and "rsprune-data index" in msg, msg
        assert err.value.field == field


WRITE_REFUSED = [
    "valid=2",
    "invalid without reason",
    "entropy NaN",
    "similarity 3",
    "offset not monotone",
    "range past the shard",
    "reasons not JSON",
]


@pytest.mark.parametrize("case", WRITE_REFUSED)
def test_write_index_never_writes_what_read_refuses(
    good: tuple[Path, Path, Arrays, Meta], case: str
) -> None:
    _, path, arrays, meta = good
    damage, field = next((d, f) for c, d, f in CASES if c == case)
    a, m = dict(arrays), dict(meta)
    damage(a, m)
    out = path.with_name("copy.rsidx.safetensors")
    with pytest.raises(ConfigError, match=field):
        write_index(out, a, m)
    assert not out.exists()


def test_loaders_and_cli_refuse_a_corrupt_index(
    good: tuple[Path, Path, Arrays, Meta], capsys: pytest.CaptureFixture[str]
) -> None:
    shard, path, arrays, meta = good
    a = dict(arrays)
    a["valid"] = a["valid"].copy()
    a["valid"][2] = 2
    _write_raw(path, a, meta)
    with pytest.raises(IndexCorruptError, match="'valid'"):
        PrunedWebDataset([str(shard)], 0.5)
    with pytest.raises(IndexCorruptError, match="'valid'"):
        PrunedShardDataset([str(shard)])
    assert cli_main(["select", str(shard), "--strategy", "entropy"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt: field 'valid'" in err and "Traceback" not in err


def test_garbage_and_truncated_files(good: tuple[Path, Path, Arrays, Meta]) -> None:
    shard, path, _, _ = good
    data = path.read_bytes()
    for bad in (b"", b"\x00" * 7, b"not a safetensors file at all", data[: len(data) // 2]):
        path.write_bytes(bad)
        with pytest.raises(IndexCorruptError, match=r"unreadable.*rsprune-data index"):
            PruneIndex.load([str(shard)])
        with pytest.raises(IndexCorruptError):
            read_metadata(path)


def test_worker_reload_of_ranges_is_checked(good: tuple[Path, Path, Arrays, Meta]) -> None:
    """A map-style dataset pickled to a worker re-reads the byte ranges: they are checked too."""
    import pickle

    shard, path, arrays, meta = good
    ds = PrunedShardDataset([str(shard)])
    clone = pickle.loads(pickle.dumps(ds))
    a = dict(arrays)
    a["offset"] = a["offset"][::-1].copy()
    _write_raw(path, a, meta)
    with pytest.raises(IndexCorruptError, match="'offset'"):
        clone[0]


def test_error_is_picklable() -> None:
    import pickle

    err = IndexCorruptError("index x is corrupt", "valid", "must be 0 or 1")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.field, back.problem) == (str(err), "valid", "must be 0 or 1")
    assert isinstance(back, ValueError)


def test_good_index_still_loads(good: tuple[Path, Path, Arrays, Meta]) -> None:
    shard, path, _, _ = good
    index = PruneIndex.load([str(shard)])
    assert len(index) == 6 and list(index.keys) == [f"s/{i:04d}" for i in range(6)]
    assert json.loads(read_metadata(path)["reasons"]) == ["decode_error"]
