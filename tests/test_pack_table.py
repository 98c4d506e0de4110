"""pack --from parquet|arrow|hf|csv on real Parquet/Arrow files written by pyarrow from shipped
images (a Git-10M-like schema), then index --meta, select --where and both loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_DATA

from rsprune_data import (
    PruneConfig,
    PrunedSampler,
    PrunedShardDataset,
    PrunedWebDataset,
    PruneIndex,
)
from rsprune_data.cli import main as cli_main
from rsprune_data.errors import ConfigError
from rsprune_data.pack_table import pack_table
from rsprune_data.tario import iter_tar_samples

FILES = sorted((SAMPLE_DATA / "harvey").rglob("*.jpeg"))[::7][:40]


def git10m_table(files: list[Path], seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(files)
    return pa.table(
        {
            "image": pa.array([f.read_bytes() for f in files], pa.binary()),
            "img_quality_score": pa.array(rng.uniform(0, 1, n), pa.float32()),
            "resolution": pa.array(rng.choice([0.5, 1.0, 2.0], n)),
            "Google_location": [f"{29 + i / 100:.2f},-95.{i:02d}" for i in range(n)],
            "caption": [f"satellite image of {f.parent.name} {i}" for i, f in enumerate(files)],
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("git10m")
    for part in range(2):  # two files, row groups of 6 rows: shards cut across both
        t = git10m_table(FILES[part * 20 : (part + 1) * 20], part)
        pq.write_table(t, d / f"train-{part:05d}-of-00002.parquet", row_group_size=6)
    return d


def read(shard: object) -> list[dict[str, bytes | str]]:
    return [{"__key__": ts.key, **members} for ts, members in iter_tar_samples(str(shard))]


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_parquet_pack_is_deterministic_parallel_and_resumable(corpus: Path, tmp_path: Path) -> None:
    src = str(corpus / "*.parquet")
    kw = {
        "keep_columns": ["caption", "img_quality_score", "resolution", "Google_location"],
        "caption_column": "caption",
        "shard_size": 9,
        "progress": False,
    }
    res = pack_table(src, tmp_path / "a", **kw)
    assert res.num_samples == 40 and len(res.shards) == 5 and not res.skipped
    two = pack_table(src, tmp_path / "b", workers=2, **kw)
    assert two.num_samples == 40 and digests(tmp_path / "a") == digests(tmp_path / "b")
    samples = [s for shard in res.shards for s in read(shard)]
    table = pa.concat_tables([pq.read_table(p) for p in sorted(corpus.glob("*.parquet"))])
    rows = table.to_pylist()
    assert [s["__key__"] for s in samples[:2]] == [
        "train-00000-of-00002-0",
        "train-00000-of-00002-1",
    ]
    assert samples[20]["__key__"] == "train-00001-of-00002-0"
    for s, row in zip(samples, rows, strict=True):
        assert s["jpg"] == row["image"]  # bytes as they are
        meta = json.loads(s["json"])
        assert (
            meta["caption"] == row["caption"] and meta["Google_location"] == row["Google_location"]
        )
        assert meta["img_quality_score"] == pytest.approx(row["img_quality_score"])
        assert s["txt"].decode() == row["caption"]
    # resume: a lost shard and a stale .partial; the rerun rewrites only what is missing
    out = tmp_path / "a"
    before = digests(out)
    (out / "shard-000002.tar").unlink()
    (out / "shard-000003.tar.partial").write_bytes(b"junk")
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    again = pack_table(src, out, **kw)
    assert again.num_samples == 40 and digests(out) == before
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime
    assert not list(out.glob("*.partial"))
    # another run's options into the same folder: refused without overwrite
    with pytest.raises(ConfigError, match="overwrite"):
        pack_table(src, out, **{**kw, "shard_size": 10})
    assert len(pack_table(src, out, overwrite=True, **{**kw, "shard_size": 10}).shards) == 4
    assert len(list(out.glob("*.tar"))) == 4
    # rank split: each rank writes its own shards only
    r1 = pack_table(src, tmp_path / "c", rank=1, world_size=2, **kw)
    assert [p.name for p in r1.shards] == ["shard-000001.tar", "shard-000003.tar"]
    assert sorted(p.name for p in (tmp_path / "c").glob("*.tar")) == [p.name for p in r1.shards]


def test_key_column_nulls_and_errors(tmp_path: Path) -> None:
    imgs = [f.read_bytes() for f in FILES[:4]]
    t = pa.table(
        {
            "image": pa.array([imgs[0], None, b"", imgs[3]], pa.binary()),
            "id": ["a.1", "b/2", "c", "d e"],
            "blob": pa.array([b"x"] * 4, pa.binary()),
        }
    )
    pq.write_table(t, tmp_path / "t.parquet")
    res = pack_table(str(tmp_path / "t.parquet"), tmp_path / "o", key_column="id", progress=False)
    assert res.num_samples == 2
    assert res.skipped == [
        ("t.parquet:1", "null or empty image"),
        ("t.parquet:2", "null or empty image"),
    ]
    assert [s["__key__"] for s in read(res.shards[0])] == ["a_1", "d_e"]
    dup = pa.table({"image": pa.array(imgs[:2], pa.binary()), "id": ["x", "x"]})
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(ConfigError, match="unique"):
        pack_table(str(tmp_path / "dup.parquet"), tmp_path / "d", key_column="id", progress=False)
    assert not list((tmp_path / "d").glob("*.tar*"))  # nothing half-written is left
    for kw, match in (
        ({"keep_columns": ["nope"]}, "no column"),
        ({"image_column": "id"}, "binary"),
        ({"keep_columns": ["blob"]}, "binary"),
        ({"fmt": "xls"}, "fmt"),
        ({"shard_size": 0}, "shard_size"),
        ({"prefix": "a/b"}, "prefix"),
    ):
        with pytest.raises(ConfigError, match=match):
            pack_table(str(tmp_path / "t.parquet"), tmp_path / "e", progress=False, **kw)
    with pytest.raises(ConfigError, match="matches no"):
        pack_table(str(tmp_path / "*.none"), tmp_path / "e", progress=False)


def test_hf_saved_dataset_arrow_file_and_csv(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    files = FILES[:5]
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "cloud_cover": datasets.Value("float32"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(f) for f in files],
            "caption": [f"c{i}" for i in range(5)],
            "cloud_cover": [0.1 * i for i in range(5)],
        },
        features=feats,
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    res = pack_table(
        str(tmp_path / "hf"),
        tmp_path / "hfo",
        fmt="hf",
        keep_columns=["cloud_cover"],
        caption_column="caption",
        progress=False,
    )
    got = read(res.shards[0])
    assert [s["jpg"] for s in got] == [f.read_bytes() for f in files]
    assert [s["txt"] for s in got] == [f"c{i}".encode() for i in range(5)]
    # Arrow IPC file format, image as an HF-style struct with only a path
    t = pa.table(
        {"image": pa.array([{"bytes": None, "path": str(f)} for f in files]), "n": list(range(5))}
    )
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t, max_chunksize=2)
    res = pack_table(
        str(tmp_path / "t.arrow"),
        tmp_path / "ao",
        fmt="arrow",
        keep_columns=["n"],
        shard_size=2,
        progress=False,
    )
    got = [s for p in res.shards for s in read(p)]
    assert [json.loads(s["json"])["n"] for s in got] == list(range(5))
    assert [s["jpg"] for s in got] == [f.read_bytes() for f in files]
    # CSV list of relative paths
    root = SAMPLE_DATA / "harvey"
    lines = (
        ["path,label,score"]
        + [f"{f.relative_to(root)},{f.parent.name},{i}" for i, f in enumerate(files)]
        + ["gone.jpeg,x,9"]
    )
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    res = pack_table(
        str(tmp_path / "list.csv"),
        tmp_path / "co",
        fmt="csv",
        image_column="path",
        keep_columns=["label", "score"],
        base_dir=root,
        progress=False,
    )
    got = read(res.shards[0])
    assert len(got) == 5 and res.skipped[0][0] == "list.csv:5"
    assert json.loads(got[1]["json"]) == {"label": files[1].parent.name, "score": 1}


def test_cli_end_to_end_with_a_metadata_filter(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    assert (
        cli_main(
            [
                "pack",
                "--from",
                "parquet",
                str(corpus / "*.parquet"),
                str(out),
                "--keep-columns",
                "caption,img_quality_score,resolution",
                "--caption-column",
                "caption",
                "--shard-size",
                "15",
                "-q",
            ]
        )
        == 0
    )
    shards = [str(p) for p in sorted(out.glob("*.tar"))]
    assert len(shards) == 3
    assert (
        cli_main(
            ["index", *shards, "--meta", "img_quality_score,resolution", "--workers", "0", "-q"]
        )
        == 0
    )
    capsys.readouterr()
    args = [
        "--prune-ratio",
        "0.3",
        "--strategy",
        "entropy",
        "--max-nodata",
        "-1",
        "--where",
        "img_quality_score>=0.4",
        "--where",
        "resolution<2",
    ]
    assert cli_main(["select", *shards, *args, "--json", "-o", str(tmp_path / "keys.txt")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [w["filter"] for w in summary["where"]] == ["img_quality_score >= 0.4", "resolution < 2"]
    table = pa.concat_tables([pq.read_table(p) for p in sorted(corpus.glob("*.parquet"))])
    q, r = np.asarray(table["img_quality_score"]), np.asarray(table["resolution"])
    passing = (q >= np.float32(0.4)) & (r < 2)
    assert summary["where"][0]["dropped"] + summary["where"][1]["dropped"] == 40 - passing.sum()
    assert summary["selected"] == min(summary["budget"], int(passing.sum()))
    cfg = PruneConfig(
        prune_ratio=0.3,
        strategy="entropy",
        max_nodata=None,
        where=[("img_quality_score", ">=", 0.4), ("resolution", "<", 2)],
    )
    keys = (tmp_path / "keys.txt").read_text().split()
    # the streaming loader delivers exactly those samples, with their metadata
    ds = PrunedWebDataset(shards, cfg, shuffle_shards=False)
    got = list(ds)
    assert sorted(s["__key__"] for s in got) == sorted(keys)
    for s in got:
        meta = json.loads(s["json"])
        assert meta["img_quality_score"] >= np.float32(0.4) and meta["resolution"] < 2
    # the map-style loader too
    index = PruneIndex.load(shards)
    sampler = PrunedSampler(index, cfg, shuffle=False)
    items = PrunedShardDataset(index)
    assert sorted(items[i]["__key__"] for i in sampler) == sorted(keys)
    assert cli_main(["select", *shards, "--where", "nope<1", "--strategy", "entropy"]) == 2
    assert "nope" in capsys.readouterr().err
    report = tmp_path / "report"
    assert cli_main(["report", *shards, *args, "-o", str(report), "-q"]) == 0
    page = (report / "index.html").read_text()
    assert "img_quality_score &gt;= 0.4" in page or "img_quality_score >= 0.4" in page


def test_tar_writer_headers_read_back_with_tarfile() -> None:
    import io
    import tarfile

    from rsprune_data.tarwrite import TarOut

    members = [
        ("a" * 150 + "/" + "b" * 20 + ".jpg", b"x" * 10),
        ("\u00e9t\u00e9.txt", b"yy"),
        ("c" * 96 + ".jpg", b"z" * 600),
        ("k-1.json", b"{}"),
        ("x/y.png", b"1" * 512),
    ]
    buf = io.BytesIO()
    w = TarOut(buf)
    for name, data in members:
        w.add(name, data)
    w.close()
    assert len(buf.getvalue()) % 512 == 0
    buf.seek(0)
    with tarfile.open(fileobj=buf) as t:
        got = [(m.name, t.extractfile(m).read(), m.mode, m.mtime, m.uname) for m in t.getmembers()]
    assert got == [(n, d, 0o444, 0, "bigdata") for n, d in members]
