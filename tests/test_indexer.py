"""The offline indexer and its CLI on real tar shards of real JPEG tiles."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SAMPLE_DATA
from PIL import Image

from rsprune_data import PruneConfig
from rsprune_data.cli import main as cli_main
from rsprune_data.entropy import entropy_from_hist
from rsprune_data.errors import (
    ConfigError,
    IndexMismatchError,
    IndexNotFoundError,
    StaleIndexError,
)
from rsprune_data.index import PruneIndex, index_path_for, read_index, write_index
from rsprune_data.indexer import index_shards, shard_share

HARVEY = SAMPLE_DATA / "harvey"


def harvey_files(n: int) -> list[Path]:
    files = sorted(HARVEY.rglob("*.jpeg"))
    return files[:: max(1, len(files) // n)][:n]


def write_shards(
    tmp: Path,
    files: list[Path],
    per_shard: int,
    *,
    corrupt: set[int] = frozenset(),
    prefix: str = "s",
) -> list[str]:
    shards = []
    for s in range(0, len(files), per_shard):
        path = tmp / f"{prefix}-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i, f in enumerate(files[s : s + per_shard], start=s):
                data = f.read_bytes()
                if i in corrupt:
                    data = data[: len(data) // 3]  # a truncated JPEG
                w.write({"__key__": f"{f.parent.name}/{f.stem.replace('.', '_')}", "jpeg": data})
        shards.append(str(path))
    return shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    return write_shards(tmp, harvey_files(60), 20, corrupt={7})


def pil_entropy(data: bytes) -> float:
    return float(entropy_from_hist(np.array(Image.open(io.BytesIO(data)).convert("L").histogram())))


def test_entropy_only_index_matches_pil_and_records_corruption(shards):
    report = index_shards(shards, workers=0, progress=False)
    assert report.ok and len(report.indexed) == 3 and report.samples == 60
    assert sum(report.invalid.values()) == 1
    index = PruneIndex.load(shards)
    assert len(index) == 60 and index.num_clusters == 0
    assert index.valid.sum() == 59 and not index.valid[7]
    # entropy agrees with an independent PIL computation, read back through the byte ranges
    for pos in (0, 5, 33, 59):
        shard = shards[int(index.shard_ids[pos])]
        with open(shard, "rb") as f:
            f.seek(int(index.offsets[pos]))
            raw = f.read(int(index.lengths[pos]))
        from rsprune_data.tario import parse_sample

        key, members = parse_sample(raw)
        assert key == index.keys[pos]
        assert abs(pil_entropy(members["jpeg"]) - float(index.entropy[pos])) < 1e-4


def test_rerun_skips_current_and_reindexes_changed_shard(tmp_path):
    shards = write_shards(tmp_path, harvey_files(20), 10)
    assert len(index_shards(shards, workers=0, progress=False).indexed) == 2
    again = index_shards(shards, workers=0, progress=False)
    assert again.indexed == [] and len(again.skipped) == 2
    # rewrite one shard with other content: its index is stale and loading says what to run
    write_shards(tmp_path, harvey_files(40)[20:], 10)
    with pytest.raises(StaleIndexError, match=r"s-00000[01]\.tar.*rsprune-data index"):
        PruneIndex.load(shards)
    third = index_shards(shards, workers=0, progress=False)
    assert len(third.indexed) == 2
    assert len(PruneIndex.load(shards)) == 20


def test_truncated_and_garbage_tars_are_reported_and_the_rest_indexed(tmp_path):
    shards = write_shards(tmp_path, harvey_files(30), 10)
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(5000))
    report = index_shards([*shards, str(garbage)], workers=2, progress=False)
    assert not report.ok
    assert set(report.failed) == {shards[1], str(garbage)}
    assert "truncated" in report.failed[shards[1]]
    assert sorted(report.indexed) == [shards[0], shards[2]]
    assert not index_path_for(shards[1]).exists()
    with pytest.raises(IndexNotFoundError, match=r"s-000001\.tar.*rsprune-data index"):
        PruneIndex.load(shards)


def test_rank_split_is_disjoint_and_covering(tmp_path):
    shards = [f"/data/s-{i:06d}.tar" for i in range(11)]
    parts = [shard_share(shards, rank=r, world_size=4) for r in range(4)]
    assert sorted(s for part in parts for s in part) == shards
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    # ranks indexing separately produce exactly the indexes of one run
    real = write_shards(tmp_path, harvey_files(30), 5)
    for r in range(3):
        index_shards(real, workers=0, rank=r, world_size=3, progress=False)
    assert all(index_path_for(s).exists() for s in real)
    assert len(PruneIndex.load(real)) == 30


def test_index_dir_and_mixed_indexes_refused(tmp_path, shards):
    out = tmp_path / "idx"
    index_shards(shards[:2], workers=0, index_dir=out, progress=False)
    assert (out / (Path(shards[0]).name + ".rsidx.safetensors")).exists()
    assert len(PruneIndex.load(shards[:2], index_dir=out)) == 40
    # an index built with other centroids beside the others is refused, naming the shard
    arrays, meta = read_index(index_path_for(shards[1], out))
    write_index(
        index_path_for(shards[1], out),
        arrays,
        {**meta, "centroids_digest": "ffff", "num_clusters": "4", "encoder": "x"},
    )
    with pytest.raises(IndexMismatchError, match=r"s-000001\.tar"):
        PruneIndex.load(shards[:2], index_dir=out)


def _arrays(shards, index_dir):
    return [read_index(index_path_for(s, index_dir)) for s in shards]


def test_resume_after_kill_9_gives_identical_result(tmp_path):
    files = harvey_files(300)
    shards = write_shards(tmp_path, files, 10)  # 30 shards: the kill lands well before the end
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    index_shards(shards, workers=0, index_dir=clean_dir, progress=False)
    cmd = [
        sys.executable,
        "-m",
        "rsprune_data.cli",
        "index",
        *shards,
        "--index-dir",
        str(killed_dir),
        "--workers",
        "0",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        p.name.endswith(".rsidx.safetensors") for p in killed_dir.glob("*")
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in killed_dir.glob("*.rsidx.safetensors"))
    assert 0 < len(done_before) < len(shards), "the kill must land mid-run"
    for p in killed_dir.glob("*.rsidx.safetensors"):  # every final-named file is complete
        read_index(p)
    report = index_shards(shards, workers=0, index_dir=killed_dir, progress=False)
    assert len(report.skipped) == len(done_before)
    assert not [p for p in killed_dir.iterdir() if not p.name.endswith(".rsidx.safetensors")]
    for (a_arr, a_meta), (b_arr, b_meta) in zip(
        _arrays(shards, clean_dir), _arrays(shards, killed_dir), strict=True
    ):
        assert a_meta == b_meta
        assert a_arr.keys() == b_arr.keys()
        for k in a_arr:
            np.testing.assert_array_equal(a_arr[k], b_arr[k])


def test_cli_exit_codes_and_select(tmp_path, capsys):
    shards = write_shards(tmp_path, harvey_files(30), 10)
    assert cli_main(["index", *shards, "--workers", "0", "-q"]) == 0
    assert (
        cli_main(
            [
                "select",
                *shards,
                "--prune-ratio",
                "0.5",
                "--strategy",
                "entropy",
                "-o",
                str(tmp_path / "keys.txt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "kept 15" in out
    keys = (tmp_path / "keys.txt").read_text().split()
    index = PruneIndex.load(shards)
    want = index.select(PruneConfig(prune_ratio=0.5, strategy="entropy"))
    assert keys == [index.keys[i] for i in want.tolist()]
    # bad input -> 2 with the argument named; a failed shard -> 1
    assert cli_main(["select", *shards, "--prune-ratio", "1.5"]) == 2
    assert "`prune_ratio` must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert cli_main(["select", str(tmp_path / "missing.tar")]) == 2
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    assert cli_main(["index", str(bad), "--workers", "0", "-q"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_cli_rgb_bands_for_multiband_geotiff(tmp_path):
    import tifffile

    from rsprune_data.images import analyze
    from rsprune_data.pack import pack_folder

    rng = np.random.default_rng(0)
    src = tmp_path / "naip"
    src.mkdir()
    tiles = []
    for i in range(3):  # 4-band uint16 tiles, bands deliberately different
        arr = (rng.random((32, 32, 4)) * np.array([1000, 20000, 40000, 65535])).astype(np.uint16)
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, photometric="minisblack", planarconfig="contig")
        (src / f"t{i}.tif").write_bytes(buf.getvalue())
        tiles.append(buf.getvalue())
    shards = [str(p) for p in pack_folder(src, tmp_path / "shards", progress=False).shards]
    assert cli_main(["index", *shards, "--workers", "0", "-q", "--rgb-bands", "3", "2", "1"]) == 0
    index = PruneIndex.load(shards)
    want = [analyze(t, "tif", rgb_bands=(3, 2, 1)).entropy for t in tiles]
    default = [analyze(t, "tif").entropy for t in tiles]
    np.testing.assert_allclose(index.entropy, want, atol=1e-5)
    assert not np.allclose(want, default)


def test_cluster_ids_are_the_argmax_of_similarities_to_the_stored_centroids(tmp_path, shards):
    """End to end with the real default encoder (small input for speed) and real centroids."""
    import torch

    from rsprune_data.centroids import Centroids, build_centroids
    from rsprune_data.embeddings import canonical
    from rsprune_data.encoders import load_encoder
    from rsprune_data.images import analyze
    from rsprune_data.tario import parse_sample

    enc = load_encoder("efficientnet-lite0", image_size=64, device="cpu")
    cents = build_centroids([SAMPLE_DATA / "ucmerced"], enc, k=8, progress=False)
    cents.save(tmp_path / "c.safetensors")
    stored = Centroids.load(tmp_path / "c.safetensors")
    out = tmp_path / "idx"
    report = index_shards(
        shards[:1],
        centroids=stored,
        encoder=enc,
        index_dir=out,
        workers=2,
        batch_size=8,
        progress=False,
    )
    assert report.ok and report.samples == 20
    index = PruneIndex.load(shards[:1], index_dir=out)
    assert index.num_clusters == 8 and index.centroids_digest == stored.digest
    with open(shards[0], "rb") as f:
        blob = f.read()
    for pos in range(20):
        if not index.valid[pos]:
            assert index.cluster_ids[pos] == -1
            continue
        start = int(index.offsets[pos])
        _, members = parse_sample(blob[start : start + int(index.lengths[pos])])
        rgb = analyze(members["jpeg"], "jpeg", want_rgb=True).rgb
        # the indexer assigns from the canonical representation (unit rows rounded to float16)
        emb = canonical(enc.encode(torch.stack([enc.preprocess(rgb)])))[0].astype(np.float32)
        sims = stored.centroids @ emb
        assert int(index.cluster_ids[pos]) == int(np.argmax(sims))
        assert abs(float(index.similarity[pos]) - float(sims.max())) < 1e-4


def test_index_dir_basename_collision_is_refused(tmp_path):
    files = harvey_files(10)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shards(tmp_path / "a", files[:5], 5)
    b = write_shards(tmp_path / "b", files[5:], 5)
    assert Path(a[0]).name == Path(b[0]).name
    out = tmp_path / "idx"
    with pytest.raises(ConfigError, match=r"would share the index file .*distinct file names"):
        index_shards([a[0], b[0]], index_dir=out, workers=0, progress=False)
    index_shards([a[0]], index_dir=out, workers=0, progress=False)
    with pytest.raises(ConfigError, match="would share the index file"):
        PruneIndex.load([a[0], b[0]], index_dir=out)
    # beside their shards the same names are fine
    index_shards([a[0], b[0]], workers=0, progress=False)
    assert len(PruneIndex.load([a[0], b[0]])) == 10


def test_bad_indexer_arguments_name_the_fix(tmp_path, capsys):
    shards = write_shards(tmp_path, harvey_files(5), 5)
    with pytest.raises(ConfigError, match="`workers` must be an integer >= 0, got -1"):
        index_shards(shards, workers=-1, progress=False)
    with pytest.raises(ConfigError, match="`batch_size` must be an integer >= 1, got 0"):
        index_shards(shards, batch_size=0, progress=False)
    assert cli_main(["index", *shards, "--workers", "-1", "-q"]) == 2
    assert "`workers` must be an integer >= 0" in capsys.readouterr().err


def test_same_size_rewrite_in_the_middle_is_stale(tmp_path):
    from rsprune_data.index import FINGERPRINT_BLOCKS

    shards = write_shards(tmp_path, harvey_files(60), 60)
    index_shards(shards, workers=0, progress=False)
    data = bytearray(Path(shards[0]).read_bytes())
    mid = len(data) * (FINGERPRINT_BLOCKS // 2) // (FINGERPRINT_BLOCKS + 1)  # a sampled block
    data[mid : mid + 4] = bytes(4 - i for i in range(4))
    Path(shards[0]).write_bytes(bytes(data))  # same size, new mtime, head and tail unchanged
    with pytest.raises(StaleIndexError, match="rsprune-data index"):
        PruneIndex.load(shards)
