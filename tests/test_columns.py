"""Optional index columns (meta.*, score.*), image keys, .npy members and the cloud/haze score."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SAMPLE_DATA

from rsprune_data.errors import ConfigError, CorruptImageError, IndexMismatchError
from rsprune_data.images import analyze, cloud_score, decode_rgb, pick_image_member
from rsprune_data.index import PruneIndex, column_info, read_index, write_index
from rsprune_data.indexer import index_shards, meta_values

HARVEY = SAMPLE_DATA / "harvey"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def jpegs(n: int, folder: str = "no_damage") -> list[bytes]:
    return [p.read_bytes() for p in sorted((HARVEY / folder).glob("*.jpeg"))[:n]]


def test_npy_members_decode_like_their_arrays() -> None:
    rng = np.random.default_rng(0)
    rgbn = rng.integers(0, 255, (24, 20, 4), dtype=np.uint8)
    st = analyze(npy(rgbn), "npy", want_rgb=True, rgb_bands=(2, 1, 0))
    assert st.rgb is not None and np.array_equal(st.rgb, rgbn[..., [2, 1, 0]])
    grey = rng.integers(0, 65535, (16, 16), dtype=np.uint16)
    assert decode_rgb(npy(grey), "npy").shape == (16, 16, 3)
    f32 = rng.normal(size=(16, 16, 3)).astype(">f4")  # big-endian float: stretched to 0..255
    out = decode_rgb(npy(f32), None)
    assert out.min() == 0 and out.max() == 255
    for bad, reason in (
        (npy(rgbn)[:90], "truncated"),
        (npy(np.zeros((2, 2, 2, 2))), "bad_shape"),
        (npy(np.array(["a", "b"])), "bad_shape"),
        (b"not an array", "decode_error"),
    ):
        with pytest.raises(CorruptImageError) as err:
            analyze(bad, "npy")
        assert err.value.reason == reason


def test_image_key_picks_any_member_and_sniffs_its_format() -> None:
    jpg = jpegs(1)[0]
    sample = {"__key__": "a", "img_content": jpg, "json": b"{}"}
    assert pick_image_member(sample) is None
    assert pick_image_member(sample, "img_content") == ("img_content", jpg)
    assert pick_image_member(sample, "missing") is None
    assert pick_image_member({"npy": b"x", "json": b"{}"}) == ("npy", b"x")
    assert analyze(jpg, None).entropy == analyze(jpg, "jpeg").entropy
    with pytest.raises(CorruptImageError):
        analyze(jpg, "webp")  # an explicit non-image extension is still refused


def test_cloud_score_separates_flat_bright_grey_from_texture() -> None:
    rng = np.random.default_rng(1)
    assert cloud_score(np.full((32, 32, 3), 220, np.uint8)) == 1.0
    textured = rng.integers(100, 255, (32, 32, 3), dtype=np.uint8)
    assert cloud_score(textured) == 0.0
    half = np.full((32, 32, 3), 220, np.uint8)
    half[:, 16:] = textured[:, 16:]
    assert cloud_score(half) == 0.5
    colourful = np.zeros((32, 32, 3), np.uint8) + np.array([250, 120, 120], np.uint8)
    assert cloud_score(colourful) == 0.0  # bright and flat but saturated: not cloud
    assert cloud_score(np.full((4, 5, 1), 230, np.uint8)) == 1.0  # smaller than a block
    data = jpegs(1)[0]
    st = analyze(data, "jpeg", want_cloud=True, want_rgb=True)
    assert st.rgb is not None and st.cloud == pytest.approx(cloud_score(st.rgb))
    assert np.isnan(analyze(data, "jpeg", want_cloud=True, fast_gray=True).cloud)
    with pytest.raises(ConfigError):
        cloud_score(np.zeros((4, 4, 3), np.float32))


def test_meta_values() -> None:
    s = {
        "json": json.dumps(
            {"cloud_cover": 0.2, "gsd": "1.5", "geo": {"lat": 3}, "ok": True, "txt": "x"}
        ).encode()
    }
    got = meta_values(s, ["cloud_cover", "gsd", "geo.lat", "ok", "txt", "absent"])
    assert got[:4] == (0.2, 1.5, 3.0, 1.0) and np.isnan(got[4]) and np.isnan(got[5])
    assert np.isnan(meta_values({"json": b"{broken"}, ["a"])[0])
    assert meta_values({"metadata.json": b'{"a": 2}'}, ["a"]) == (2.0,)
    assert np.isnan(meta_values({}, ["a"])[0])


def _shard(path: Path, samples: list[dict[str, bytes | str]]) -> str:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def test_index_stores_meta_and_cloud_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    imgs = jpegs(6)
    a = _shard(
        tmp_path / "a.tar",
        [
            {
                "__key__": f"a{i}",
                "img_content": d,
                **(
                    {"json": json.dumps({"cloud_cover": i / 10, "gsd": 0.5}).encode()}
                    if i != 3
                    else {}
                ),
            }
            for i, d in enumerate(imgs)
        ],
    )
    b = _shard(
        tmp_path / "b.tar",
        [
            {
                "__key__": "b0",
                "npy": npy(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8)),
                "json": b'{"cloud_cover": 0.9}',
            },
            {"__key__": "b1", "npy": npy(rng.integers(0, 255, (16, 16), dtype=np.uint8))},
        ],
    )
    rep = index_shards(
        [a],
        workers=0,
        progress=False,
        image_key="img_content",
        meta_fields="cloud_cover,gsd",
        cloud_score=True,
    )
    assert rep.ok and rep.meta_missing == {"cloud_cover": 1, "gsd": 1}
    rep = index_shards(
        [b], workers=0, progress=False, meta_fields=["cloud_cover"], cloud_score=True
    )
    assert rep.ok and not rep.invalid
    arrays, meta = read_index(a + ".rsidx.safetensors")
    info = json.loads(meta["columns"])
    assert sorted(info) == ["meta.cloud_cover", "meta.gsd", "score.cloud"]
    assert info["meta.gsd"] == {"dtype": "float32", "version": "1", "source": "json:gsd"}
    assert meta["image_key"] == "img_content"
    want = [0.0, 0.1, 0.2, np.nan, 0.4, 0.5]
    np.testing.assert_allclose(arrays["meta.cloud_cover"], want, rtol=1e-6)
    scores = [analyze(d, "jpeg", want_cloud=True).cloud for d in imgs]
    np.testing.assert_allclose(arrays["score.cloud"], scores, rtol=1e-6)
    idx = PruneIndex.load([a, b])
    assert sorted(idx.columns) == ["meta.cloud_cover", "meta.gsd", "score.cloud"]
    np.testing.assert_allclose(idx.columns["meta.cloud_cover"][6:], [0.9, np.nan])
    assert np.isnan(idx.columns["meta.gsd"][6:]).all()  # b was indexed without gsd
    assert idx.valid.all()
    # current with the same options; another --meta list or image key indexes again
    assert index_shards(
        [a],
        workers=0,
        progress=False,
        image_key="img_content",
        meta_fields=["cloud_cover", "gsd"],
        cloud_score=True,
    ).skipped == [a]
    assert index_shards(
        [a],
        workers=0,
        progress=False,
        image_key="img_content",
        meta_fields=["gsd"],
        cloud_score=True,
    ).indexed == [a]
    assert sorted(PruneIndex.load([a]).columns) == ["meta.gsd", "score.cloud"]
    assert index_shards(
        [a], workers=0, progress=False, image_key="img_content", meta_fields=["gsd"]
    ).indexed == [a]  # entropy-only default: no score
    assert sorted(PruneIndex.load([a]).columns) == ["meta.gsd"]
    assert index_shards([a], workers=0, progress=False).indexed == [a]
    assert PruneIndex.load([a]).valid.sum() == 0  # no image member without the key
    for bad in ({"meta_fields": "a,,a"}, {"meta_fields": ["a b"]}, {"image_key": "__key__"}):
        with pytest.raises(ConfigError):
            index_shards([a], workers=0, progress=False, **bad)  # type: ignore[arg-type]


def test_write_index_checks_optional_columns(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s.tar", [{"__key__": "k", "jpeg": jpegs(1)[0]}])
    index_shards([shard], workers=0, progress=False)
    arrays, meta = read_index(shard + ".rsidx.safetensors")
    assert "columns" not in meta and not PruneIndex.load([shard]).columns
    path = tmp_path / "x.rsidx.safetensors"
    with pytest.raises(ConfigError, match="columns"):
        write_index(path, {**arrays, "meta.a": np.ones(1)}, meta)
    with pytest.raises(ConfigError, match="num_samples"):
        write_index(
            path,
            {**arrays, "meta.a": np.ones(2)},
            {**meta, "columns": json.dumps({"meta.a": column_info("json:a")})},
        )
    write_index(
        path,
        {**arrays, "meta.a": np.ones(1)},
        {**meta, "columns": json.dumps({"meta.a": column_info("json:a", "2")})},
    )
    other = tmp_path / "y.rsidx.safetensors"
    write_index(
        other,
        {**arrays, "meta.a": np.ones(1)},
        {**meta, "columns": json.dumps({"meta.a": column_info("json:a", "1")})},
    )
    with pytest.raises(IndexMismatchError, match="version"):
        PruneIndex.load([str(path), str(other)], check_stale=False)
    bad = tmp_path / "z.rsidx.safetensors"
    with pytest.raises(IndexMismatchError, match="columns"):
        write_index(bad, arrays, {**meta, "columns": "[1, 2]"})


def test_cli_cloud_score_and_max_cloud(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsprune_data.cli import main as cli_main

    files = (
        sorted((HARVEY / "bad_images").glob("*.jpeg"))[:10]
        + sorted((HARVEY / "damage").glob("*.jpeg"))[:10]
    )
    shard = _shard(
        tmp_path / "c.tar",
        [{"__key__": f"k{i}", "jpeg": f.read_bytes()} for i, f in enumerate(files)],
    )
    args = [
        "select",
        shard,
        "--strategy",
        "entropy",
        "--prune-ratio",
        "0",
        "--max-cloud",
        "0.3",
        "--json",
    ]
    assert cli_main(["index", shard, "--workers", "0", "-q"]) == 0
    assert cli_main(args) == 2  # entropy-only default: no score, a clear error
    assert "--cloud-score" in capsys.readouterr().err
    assert cli_main(["index", shard, "--workers", "0", "-q", "--cloud-score"]) == 0
    capsys.readouterr()
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    index = PruneIndex.load([shard])
    cloud, ok = index.columns["score.cloud"], index.nodata <= 0.05
    assert summary["cloud_dropped"] == int((ok & (cloud > 0.3)).sum()) > 0
    assert summary["selected"] == int((ok & ~(cloud > 0.3)).sum())
