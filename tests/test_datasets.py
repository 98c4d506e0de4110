"""PrunedShardDataset / PrunedImageFolder on real tar shards of tiny real JPEGs."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from rsprune_data import CorruptImageError, PruneIndex, ShardError
from rsprune_data.datasets import PrunedImageFolder, PrunedShardDataset
from rsprune_data.errors import ConfigError
from rsprune_data.images import decode_rgb
from rsprune_data.index import index_path_for, shard_fingerprint, write_index
from rsprune_data.integrity import range_checksums
from rsprune_data.pack import pack_folder
from rsprune_data.tario import scan_tar

NUM_CLUSTERS = 4


def tiny_jpeg(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def index_shard(shard: Path, *, seed: int = 0, index_dir: Path | None = None) -> Path:
    """Write a real index file for ``shard``: byte ranges and keys from the tar, scores random."""
    samples = scan_tar(shard)
    n = len(samples)
    rng = np.random.default_rng([seed, n])
    raw = [s.key.encode() for s in samples]
    key_offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(r) for r in raw], out=key_offsets[1:])
    st = shard.stat()
    arrays = {
        "entropy": rng.uniform(4.0, 8.0, n),
        "nodata": np.zeros(n),
        "cluster_id": rng.integers(0, NUM_CLUSTERS, n),
        "similarity": rng.uniform(0.1, 0.9, n),
        "valid": np.ones(n),
        "reason": np.zeros(n),
        "offset": [s.offset for s in samples],
        "length": [s.length for s in samples],
        "checksum": range_checksums(str(shard), [(s.offset, s.length) for s in samples]),
        "key_bytes": np.frombuffer(b"".join(raw), np.uint8),
        "key_offsets": key_offsets,
    }
    meta = {
        "shard": shard.name,
        "shard_size": str(st.st_size),
        "shard_mtime_ns": str(st.st_mtime_ns),
        "shard_fingerprint": shard_fingerprint(shard),
        "encoder": "test",
        "centroids_digest": "d" * 16,
        "num_clusters": str(NUM_CLUSTERS),
        "reasons": json.dumps(["ok"]),
    }
    path = index_path_for(shard, index_dir)
    write_index(path, arrays, meta)
    return path


def make_indexed_shards(
    root: Path, sizes: tuple[int, ...] = (7, 5, 9), *, extra: bool = True
) -> list[Path]:
    """Tar shards of tiny real JPEGs (plus a ``cls`` and a ``json`` member), each indexed."""
    root.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    k = 0
    for s, size in enumerate(sizes):
        path = root / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for _ in range(size):
                sample: dict[str, object] = {"__key__": f"s{s}/img{k:04d}", "jpg": tiny_jpeg(k)}
                if extra:
                    sample["cls"] = str(k % 3).encode()
                    sample["json"] = json.dumps({"k": k}).encode()
                w.write(sample)
                k += 1
        index_shard(path, seed=s)
        shards.append(path)
    return shards


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return make_indexed_shards(tmp_path / "shards")


def wds_samples(shards: list[Path]) -> list[dict[str, object]]:
    return list(wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False))


def test_items_match_webdataset_byte_for_byte(shards: list[Path]) -> None:
    ds = PrunedShardDataset([str(s) for s in shards])
    ref = wds_samples(shards)
    assert len(ds) == len(ref) == 21
    for i, want in enumerate(ref):
        got = ds[i]
        assert got["__key__"] == want["__key__"]
        assert got["__url__"] == want["__url__"]
        members = {k: v for k, v in want.items() if not k.startswith("__")}
        assert {k: v for k, v in got.items() if not k.startswith("__")} == members
    assert ds[-1]["__key__"] == ref[-1]["__key__"]


def test_accepts_a_loaded_index_and_index_dir(tmp_path: Path) -> None:
    shards = make_indexed_shards(tmp_path / "a", (3, 4))
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for s in shards:
        shutil.move(index_path_for(s), index_path_for(s, idx_dir))
    ds = PrunedShardDataset([str(s) for s in shards], index_dir=idx_dir)
    index = PruneIndex.load([str(s) for s in shards], idx_dir)
    ds2 = PrunedShardDataset(index)
    assert [ds[i]["__key__"] for i in range(len(ds))] == list(index.keys)
    assert [ds2[i]["__key__"] for i in range(len(ds2))] == list(index.keys)
    assert ds2.fingerprint == index.fingerprint


def test_decode_rgb_callable_and_transform(shards: list[Path]) -> None:
    raw = PrunedShardDataset([str(s) for s in shards])
    rgb = PrunedShardDataset([str(s) for s in shards], decode="rgb")
    img = rgb[3]["jpg"]
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img, decode_rgb(raw[3]["jpg"], "jpg"))
    fn = PrunedShardDataset(
        [str(s) for s in shards], decode=lambda s: int(s["cls"]), transform=lambda c: c * 10
    )
    assert fn[4] == int(raw[4]["cls"]) * 10
    tr = PrunedShardDataset([str(s) for s in shards], transform=lambda s: s["__key__"])
    assert tr[0] == raw[0]["__key__"]
    with pytest.raises(ConfigError, match="decode"):
        PrunedShardDataset([str(s) for s in shards], decode="bgr")


def test_decode_rgb_without_image_member(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with wds.TarWriter(str(path), encoder=False) as w:
        w.write({"__key__": "a", "txt": b"hello"})
    index_shard(path)
    ds = PrunedShardDataset([str(path)], decode="rgb")
    with pytest.raises(CorruptImageError, match="no image member"):
        ds[0]


def test_positions_checked(shards: list[Path]) -> None:
    ds = PrunedShardDataset([str(s) for s in shards])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(TypeError):
        ds["0"]  # type: ignore[index]
    assert ds[np.int64(2)]["__key__"] == ds[2]["__key__"]


def test_pickle_is_light_and_reloads_ranges(tmp_path: Path) -> None:
    shards = make_indexed_shards(tmp_path / "big", (400, 300), extra=False)
    ds = PrunedShardDataset([str(s) for s in shards])
    _ = ds[5]  # opens a file descriptor, which must not travel
    blob = pickle.dumps(ds)
    assert len(blob) < 2000, len(blob)  # paths only, no per-sample arrays
    clone = pickle.loads(blob)
    for i in (0, 399, 400, 699):
        assert clone[i]["__key__"] == ds[i]["__key__"]
        assert clone[i]["jpg"] == ds[i]["jpg"]


def test_in_memory_index_keeps_ranges_when_pickled(shards: list[Path]) -> None:
    loaded = PruneIndex.load([str(s) for s in shards])
    mem = PruneIndex.from_arrays(
        loaded.entropy,
        loaded.cluster_ids,
        loaded.similarity,
        num_clusters=loaded.num_clusters,
        offsets=loaded.offsets,
        lengths=loaded.lengths,
        shard_ids=loaded.shard_ids,
        shards=[str(s) for s in shards],
    )
    ds = pickle.loads(pickle.dumps(PrunedShardDataset(mem)))
    assert [ds[i]["__key__"] for i in range(len(ds))] == list(loaded.keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_reopen_files(shards: list[Path], num_workers: int) -> None:
    ds = PrunedShardDataset([str(s) for s in shards], transform=lambda s: s["__key__"])
    first = ds[0]  # the parent opens a descriptor before forking
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers)
    keys = [k for batch in loader for k in batch]
    assert keys[0] == first
    assert keys == list(PruneIndex.load([str(s) for s in shards]).keys)


def sample_key(sample: dict[str, object]) -> object:
    return sample["__key__"]


def test_spawned_worker_gets_light_pickle(shards: list[Path]) -> None:
    ds = PrunedShardDataset([str(s) for s in shards], transform=sample_key)
    loader = DataLoader(ds, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    assert [k for b in loader for k in b] == [ds[i] for i in range(len(ds))]


def test_truncated_shard_is_a_shard_error(tmp_path: Path) -> None:
    (shard,) = make_indexed_shards(tmp_path / "t", (6,))
    ds = PrunedShardDataset([str(shard)], check_stale=False)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    ds.close()
    with pytest.raises(ShardError, match="changed since indexing"):
        ds[5]


def test_stream_shards_refused() -> None:
    index = PruneIndex.from_arrays(
        [5.0],
        [0],
        [0.5],
        num_clusters=1,
        shards=["pipe:curl -s https://example.com/shard-000000.tar"],
    )
    with pytest.raises(ConfigError, match="random access"):
        PrunedShardDataset(index)


def test_missing_shard_file(tmp_path: Path) -> None:
    index = PruneIndex.from_arrays(
        [5.0], [0], [0.5], num_clusters=1, shards=[str(tmp_path / "gone.tar")]
    )
    with pytest.raises(ShardError, match=r"cannot open shard .*gone\.tar"):
        PrunedShardDataset(index)[0]


# ---------------------------------------------------------------------------- image folder
def make_folder(root: Path) -> None:
    files = {
        "b/z.jpg": 1,
        "a/x.JPG": 2,
        "a/sub/y.png": 3,
        "a/x.jpeg": 4,
        "top.tif": 5,
        "a/dot.ted.jpg": 6,
        "a/dot_ted.jpg": 7,
        "B/upper.jpg": 8,
        ".hidden/h.jpg": 9,
        "a/.h.jpg": 10,
        "a/notes.txt": 11,
    }
    for rel, seed in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        ext = rel.rsplit(".", 1)[1].lower()
        if ext in ("jpg", "jpeg"):
            p.write_bytes(tiny_jpeg(seed))
        elif ext == "txt":
            p.write_text("not an image")
        else:
            img = Image.fromarray(np.full((4, 4, 3), seed * 20, np.uint8))
            img.save(p, format="PNG" if ext == "png" else "TIFF")
    (root / "a" / "empty.jpg").write_bytes(b"")


def test_image_folder_matches_pack_order_keys_and_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_folder(src)
    result = pack_folder(src, tmp_path / "packed", shard_size=3, progress=False)
    for s in result.shards:
        index_shard(s)
    folder = PrunedImageFolder(src)
    packed = PrunedShardDataset([str(s) for s in result.shards])
    assert len(folder) == len(packed) == result.num_samples == 8
    for i in range(len(folder)):
        a, b = folder[i], packed[i]
        assert a["__key__"] == b["__key__"]
        assert {k: v for k, v in a.items() if not k.startswith("__")} == {
            k: v for k, v in b.items() if not k.startswith("__")
        }
    assert folder.files == sorted(folder.files)
    assert "a/empty.jpg" not in folder.files and not any(
        "/." in f or f.startswith(".") for f in folder.files
    )


def test_image_folder_decode_and_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_folder(src)
    ds = PrunedImageFolder(src, decode="rgb", transform=lambda s: s)
    pos = ds.files.index("a/sub/y.png")
    assert ds[pos]["png"].shape == (4, 4, 3)
    assert ds[pos]["cls.txt"] == b"a"
    with pytest.raises(ConfigError, match="not an existing folder"):
        PrunedImageFolder(tmp_path / "nope")


def test_dataset_len_matches_index(shards: list[Path]) -> None:
    index = PruneIndex.load([str(s) for s in shards])
    ds = PrunedShardDataset(index)
    assert len(ds) == len(index)
    assert torch.utils.data.get_worker_info() is None
    assert os.path.basename(ds[0]["__url__"]) == "shard-000000.tar"
