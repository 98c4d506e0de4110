"""pack_folder: order, keys, class field, shard naming and splitting, atomicity, webdataset round trip."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from conftest import SAMPLE_DATA

import rsprune_data.pack as pack_mod
from rsprune_data.errors import ConfigError
from rsprune_data.pack import PackResult, pack_folder

JPEG = sorted((SAMPLE_DATA / "harvey" / "damage").iterdir())[0].read_bytes()


def make_tree(root: Path) -> dict[str, bytes]:
    """A small folder with dotted names, a key collision, upper-case extensions and junk."""
    files = {
        "b/-93.52_30.98.jpeg": JPEG + b"1",
        "b/-93_52_30_98.jpeg": JPEG + b"2",  # same key as the one above once dots are replaced
        "a/x.JPG": JPEG + b"3",
        "a/x.png": JPEG + b"4",  # same stem, other extension: must not merge into one sample
        "a/deep/er/y.tif": JPEG + b"5",
        "top.jpg": JPEG + b"6",
    }
    junk = {"a/notes.txt": b"text", ".hidden/z.jpg": JPEG, "a/._x.jpg": JPEG, "a/empty.jpg": b""}
    for rel, data in {**files, **junk}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def shard_names(folder: Path) -> list[str]:
    """The visible files of ``folder`` (the hidden pack manifest left out)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def read_back(shards: list[Path]) -> list[dict]:
    return list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))


def test_order_keys_cls_and_round_trip(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    result = pack_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert isinstance(result, PackResult)
    assert result.num_samples == 6
    assert result.shards == [tmp_path / "out" / "shard-000000.tar"]
    assert result.skipped == [
        (".hidden/z.jpg", "hidden file or folder"),
        ("a/._x.jpg", "hidden file or folder"),
        ("a/empty.jpg", "empty file"),
    ]
    samples = read_back(result.shards)
    assert [s["__key__"] for s in samples] == [
        "a/deep/er/y",
        "a/x",
        "a/x_1",
        "b/-93_52_30_98",
        "b/-93_52_30_98_1",
        "top",
    ]
    order = sorted(files)  # relative POSIX path as a string
    for sample, rel in zip(samples, order, strict=True):
        ext = rel.rsplit(".", 1)[1].lower()
        assert sample[ext] == files[rel]  # identical bytes under the lower-cased extension
        if "/" in rel:
            assert sample["cls.txt"] == rel.split("/")[0].encode()
        else:
            assert "cls.txt" not in sample


def test_default_webdataset_decoding_works(tmp_path: Path) -> None:
    result = pack_folder(SAMPLE_DATA / "harvey", tmp_path, shard_size=100, progress=False)
    ds = wds.WebDataset([str(s) for s in result.shards], shardshuffle=False).decode("rgb8")
    sample = next(iter(ds))
    assert sample["cls.txt"] == "bad_images"  # a str, where "cls" would be parsed as an int
    assert sample["jpeg"].shape == (128, 128, 3)


def test_shard_naming_and_split(tmp_path: Path) -> None:
    result = pack_folder(
        SAMPLE_DATA / "ucmerced", tmp_path, shard_size=40, prefix="uc", progress=False
    )
    assert [p.name for p in result.shards] == ["uc-000000.tar", "uc-000001.tar", "uc-000002.tar"]
    counts = []
    for p in result.shards:
        with tarfile.open(p) as tar:
            counts.append(len(tar.getnames()) // 2)  # jpg + cls.txt per sample
    assert counts == [40, 40, 25]
    keys = [s["__key__"] for s in read_back(result.shards)]
    assert keys == sorted(keys) and len(set(keys)) == 105
    assert keys[0] == "agricultural/agricultural00"
    assert not list(tmp_path.glob("*.partial"))


def test_same_folder_packs_to_identical_bytes(tmp_path: Path) -> None:
    a = pack_folder(SAMPLE_DATA / "harvey" / "bad_images", tmp_path / "a", progress=False)
    b = pack_folder(SAMPLE_DATA / "harvey" / "bad_images", tmp_path / "b", progress=False)
    assert a.shards[0].read_bytes() == b.shards[0].read_bytes()


def test_interrupted_pack_leaves_only_complete_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pack_mod.pack_sample
    calls = {"n": 0}

    def failing(rel: str, data: bytes, keys: set[str]) -> dict[str, object]:
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(rel, data, keys)

    monkeypatch.setattr(pack_mod, "pack_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(SAMPLE_DATA / "harvey" / "bad_images", tmp_path, shard_size=10, progress=False)
    assert shard_names(tmp_path) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(read_back(sorted(tmp_path.glob("*.tar")))) == 20


def test_existing_shards_need_overwrite(tmp_path: Path) -> None:
    src = SAMPLE_DATA / "harvey" / "bad_images"
    first = pack_folder(src, tmp_path, shard_size=10, progress=False)  # 4 shards
    before = {p: p.stat().st_mtime_ns for p in first.shards}
    again = pack_folder(src, tmp_path, shard_size=10, progress=False)  # finished: nothing to do
    assert again.shards == first.shards and again.resumed_shards == 4
    assert {p: p.stat().st_mtime_ns for p in again.shards} == before
    with pytest.raises(ConfigError, match=r"other settings.*--overwrite \(overwrite=True\)"):
        pack_folder(src, tmp_path, shard_size=25, progress=False)
    result = pack_folder(src, tmp_path, shard_size=25, progress=False, overwrite=True)
    assert shard_names(tmp_path) == ["shard-000000.tar", "shard-000001.tar"]
    assert result.num_samples == 40
    (tmp_path / ".shard.pack.json").unlink()  # shards of unknown origin are never resumed
    with pytest.raises(ConfigError, match=r"another run \(no manifest\)"):
        pack_folder(src, tmp_path, shard_size=25, progress=False)


def test_percent_in_paths(tmp_path: Path) -> None:
    out = tmp_path / "100%"
    result = pack_folder(SAMPLE_DATA / "harvey" / "bad_images", out, prefix="p%d", progress=False)
    assert [p.name for p in result.shards] == ["p%d-000000.tar"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"src_dir": "/nonexistent/folder"}, "src_dir"),
        ({"shard_size": 0}, "shard_size"),
        ({"shard_size": 2.5}, "shard_size"),
        ({"prefix": "a/b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {
        "src_dir": SAMPLE_DATA / "harvey",
        "out_dir": tmp_path / "out",
        "progress": False,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        pack_folder(**args)


def test_no_images_found(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no image files"):
        pack_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_all_files_skipped_writes_no_shard(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"")
    result = pack_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert (
        result.shards == []
        and result.num_samples == 0
        and result.skipped == [("a.jpg", "empty file")]
    )
    assert shard_names(tmp_path / "out") == []
