"""Faults stay local and nothing is lost silently: real damaged files, real processes, real mounts.

Indexer: corrupt compressed TIFFs of several codecs, forged tar headers, a worker killed with
SIGKILL, a full filesystem (tmpfs), a read-only folder, a shard replaced while it is read, indexes
of another kind (consent). Loaders: a shard changed in the middle with size and mtime restored,
shifted byte ranges, version-1 indexes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_indexer import harvey_files, write_shards

from rsprune_data import PruneConfig, PrunedShardDataset, PrunedWebDataset, PruneIndex
from rsprune_data import index as idx
from rsprune_data._index_work import Job, shard_chunks
from rsprune_data.cli import main as cli_main
from rsprune_data.errors import ChecksumError, ConfigError, OverwriteError, StaleIndexError
from rsprune_data.indexer import index_shards

ALL = PruneConfig(prune_ratio=0.0, entropy_filter="none", max_nodata=None, strategy="entropy")
CODECS = ("lzw", "zlib", "zstd", "packbits", "lzma", "webp", "jpeg")


def _tiff(arr: np.ndarray, compression: str) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression=compression, photometric="rgb", rowsperstrip=16)
    return buf.getvalue()


def _damage_strips(data: bytes) -> bytes:
    """Flip bytes all through the compressed strips of the first page (headers intact)."""
    import tifffile

    out = bytearray(data)
    page = tifffile.TiffFile(io.BytesIO(data)).pages.first
    for off, count in zip(page.dataoffsets, page.databytecounts, strict=True):
        for k in range(off + 2, off + count, 7):
            out[k] ^= 0xA5
    return bytes(out)


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A real, small tmpfs at ``path`` (needs root, as in CI); skips the test where not allowed."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["size=1m", *options]), "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- per-image failures ---------------------------------------------------------------------------


def test_corrupt_tiffs_of_every_codec_are_invalid_samples_not_dead_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    bad = tmp_path / "codecs.tar"
    with wds.TarWriter(str(bad)) as w:
        for c in CODECS:
            w.write({"__key__": f"ok-{c}", "tif": _tiff(arr, c)})
            w.write({"__key__": f"bad-{c}", "tif": _damage_strips(_tiff(arr, c))})
    write_shards(tmp_path, harvey_files(10), 10, prefix="good")
    shards = [str(bad), str(tmp_path / "good-000000.tar")]
    report = index_shards(shards, workers=2, progress=False)
    assert report.ok and sorted(report.indexed) == sorted(shards) and not report.failed
    assert sum(report.invalid.values()) == len(CODECS)
    assert set(report.invalid) == {"decode_error"}
    assert "bad-" in report.examples["decode_error"]
    index = PruneIndex.load(shards)
    keys = list(index.keys)
    bad_pos = [i for i, k in enumerate(keys) if k.startswith("bad-")]
    assert not index.valid[bad_pos].any() and index.valid.sum() == len(keys) - len(CODECS)
    assert {index.reasons[index.reason[i]] for i in bad_pos} == {"decode_error"}


# --- per-shard failures ---------------------------------------------------------------------------


def _forged_pax_tar(path: Path) -> None:
    """A small tar whose second member's pax header declares size=99999999999999."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for i, data in enumerate((b"\xff\xd8" + os.urandom(900), os.urandom(900))):
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            if i == 1:
                info.pax_headers = {"size": "99999999999999"}
            t.addfile(info, io.BytesIO(data))


def test_forged_header_fails_its_shard_by_name_and_the_rest_completes(
    tmp_path: Path, capsys
) -> None:
    shards = write_shards(tmp_path, harvey_files(20), 10)
    forged = tmp_path / "forged.tar"
    _forged_pax_tar(forged)
    order = [shards[0], str(forged), shards[1]]
    out = tmp_path / "report.json"
    assert cli_main(["index", *order, "--workers", "2", "-q", "--report-json", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED {forged}: shard {forged} is truncated" in err
    report = json.loads(out.read_text())
    assert report["ok"] is False and sorted(report["indexed"]) == sorted(shards)
    assert [f["shard"] for f in report["failed"]] == [str(forged)]
    assert "100000000003071" in report["failed"][0]["reason"]  # 3072 + the forged size
    # the rerun retries exactly the failed shard (the two good ones are current)
    again = index_shards(order, workers=0, progress=False)
    assert sorted(again.skipped) == sorted(shards) and list(again.failed) == [str(forged)]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _holder_of(path: Path, pids: list[int]) -> int | None:
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == str(path):
                        return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_worker_killed_by_sigkill_fails_only_its_shard(tmp_path: Path) -> None:
    """A FIFO shard holds one worker in a read, deterministically; that worker is SIGKILLed."""
    shards = write_shards(tmp_path, harvey_files(40), 10)
    fifo = tmp_path / "s-fifo.tar"
    os.mkfifo(fifo)
    order = [shards[0], str(fifo), *shards[1:]]
    report_path = tmp_path / "report.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rsprune_data.cli",
            "index",
            *order,
            "--workers",
            "2",
            "-q",
            "--report-json",
            str(report_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        wfd = None
        while wfd is None:  # succeeds once a worker has the FIFO open for reading
            try:
                wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO and time.monotonic() < deadline
                time.sleep(0.01)
        victim = None
        while victim is None:
            victim = _holder_of(fifo, _children(proc.pid))
            assert time.monotonic() < deadline, "no worker holds the FIFO"
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        os.close(wfd)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert f"FAILED {fifo}: worker process killed by SIGKILL (signal 9)" in err
    assert "indexed 4 shard(s)" in out
    report = json.loads(report_path.read_text())
    assert sorted(report["indexed"]) == sorted(shards)
    assert [f["shard"] for f in report["failed"]] == [str(fifo)]
    # the rerun retries exactly that shard, now a real file
    fifo.unlink()
    write_shards(tmp_path, harvey_files(45)[40:], 10, prefix="s-fifo")
    Path(tmp_path / "s-fifo-000000.tar").rename(fifo)
    again = index_shards(order, workers=2, progress=False)
    assert again.indexed == [str(fifo)] and sorted(again.skipped) == sorted(shards)
    assert len(PruneIndex.load(order)) == 45


def test_full_filesystem_fails_each_shard_by_name_then_resumes(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, harvey_files(20), 10)
    with tmpfs(tmp_path / "full") as out:
        filler = out / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # until ENOSPC: the disk is really full
                f.write(b"\0" * 4096)
        report = index_shards(shards, index_dir=out, workers=2, progress=False)
        assert sorted(report.failed) == sorted(shards) and not report.indexed
        assert all("No space left on device" in why for why in report.failed.values())
        assert cli_main(["index", *shards, "--index-dir", str(out), "--workers", "0", "-q"]) == 1
        assert not [p for p in out.iterdir() if p.name != "filler"]  # no partial files left
        filler.unlink()
        again = index_shards(shards, index_dir=out, workers=2, progress=False)
        assert again.ok and sorted(again.indexed) == sorted(shards)
        assert len(PruneIndex.load(shards, index_dir=out)) == 20


def test_read_only_folder_fails_each_shard_by_name(tmp_path: Path, capsys) -> None:
    shards = write_shards(tmp_path, harvey_files(20), 10)
    with tmpfs(tmp_path / "ro", "ro") as out:  # root ignores mode bits: a read-only mount
        assert cli_main(["index", *shards, "--index-dir", str(out), "--workers", "2", "-q"]) == 1
        err = capsys.readouterr().err
        for shard in shards:
            assert f"FAILED {shard}: " in err
        assert "Read-only file system" in err


def test_shard_replaced_or_changed_while_being_read_is_failed(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, harvey_files(20), 20)
    other = write_shards(tmp_path, harvey_files(40)[20:], 20, prefix="o")
    job = Job((shards[0],), 4, None, (0, 1, 2))
    chunks = shard_chunks(job, 0)
    first = next(chunks)  # metadata taken, reading under way
    assert not first["done"] and len(first["rows"]) == 4
    os.replace(other[0], shards[0])  # replaced by another file (new inode)
    last = list(chunks)[-1]
    assert last["done"] and last["meta"] is None
    assert "replaced or changed while being indexed" in last["error"]
    # an in-place rewrite of the head with size and mtime restored is caught as well
    shards = write_shards(tmp_path, harvey_files(20), 20, prefix="p")
    st = os.stat(shards[0])
    chunks = shard_chunks(Job((shards[0],), 4, None, (0, 1, 2)), 0)
    next(chunks)
    with open(shards[0], "r+b") as f:
        f.seek(600)
        head = f.read(16)
        f.seek(600)
        f.write(bytes(b ^ 0xFF for b in head))
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    last = list(chunks)[-1]
    assert last["error"] and "while being indexed" in last["error"]


# --- consent ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def projection(tmp_path_factory):
    """A tiny deterministic encoder and real centroids built with it on UC Merced."""
    from conftest import SAMPLE_DATA
    from test_centroids import ProjectionEncoder

    from rsprune_data.centroids import Centroids, build_centroids

    enc = ProjectionEncoder()
    cents = build_centroids([SAMPLE_DATA / "ucmerced"], enc, k=4, progress=False, num_workers=0)
    path = tmp_path_factory.mktemp("cents") / "c.safetensors"
    cents.save(path)
    return enc, Centroids.load(path)


def test_indexes_of_another_kind_are_not_replaced_without_overwrite(
    tmp_path: Path, projection, capsys
) -> None:
    enc, cents = projection
    shards = write_shards(tmp_path, harvey_files(20), 10)
    assert index_shards(shards, centroids=cents, encoder=enc, workers=0, progress=False).ok
    before = {s: idx.index_path_for(s).read_bytes() for s in shards}
    # entropy-only over embeddings: refused before any work, naming what it would replace
    with pytest.raises(
        OverwriteError,
        match=r"replace 2 index\(es\) of another kind with "
        r"entropy-only .*test-projection.*--overwrite",
    ):
        index_shards(shards, workers=0, progress=False)
    assert cli_main(["index", *shards, "--workers", "0", "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # other centroids (another K): refused as well
    import dataclasses

    other = dataclasses.replace(
        cents,
        centroids=cents.centroids[:3],
        composition=cents.composition[:3],
        cluster_sizes=cents.cluster_sizes[:3],
    )
    assert other.digest != cents.digest
    with pytest.raises(OverwriteError, match="K=4"):
        index_shards(shards, centroids=other, encoder=enc, workers=0, progress=False)
    assert {s: idx.index_path_for(s).read_bytes() for s in shards} == before  # untouched
    # the same kind again is a no-op; --overwrite replaces
    assert (
        len(index_shards(shards, centroids=cents, encoder=enc, workers=0, progress=False).skipped)
        == 2
    )
    assert cli_main(["index", *shards, "--workers", "0", "-q", "--overwrite"]) == 0
    assert PruneIndex.load(shards).num_clusters == 0
    # entropy modes are kinds too
    with pytest.raises(OverwriteError, match="entropy-only"):
        index_shards(shards, workers=0, fast_gray=True, progress=False)


# --- loaders refuse changed bytes -----------------------------------------------------------------


def _outside_fingerprint(size: int, start: int, stop: int) -> int:
    """A byte position in [start, stop) that shard_fingerprint does not read."""
    sampled = [(0, idx.FINGERPRINT_BYTES), (size - idx.FINGERPRINT_BYTES, size)]
    sampled += [
        (size * i // (idx.FINGERPRINT_BLOCKS + 1), size * i // (idx.FINGERPRINT_BLOCKS + 1) + 4096)
        for i in range(1, idx.FINGERPRINT_BLOCKS + 1)
    ]
    for pos in range(start, stop):
        if not any(a <= pos < b for a, b in sampled):
            return pos
    raise AssertionError("no unsampled byte in range")


def test_loaders_refuse_a_shard_changed_in_the_middle_with_size_and_mtime_kept(
    tmp_path: Path,
) -> None:
    shards = write_shards(tmp_path, harvey_files(120), 120)
    shard = shards[0]
    assert index_shards(shards, workers=0, progress=False).ok
    index = PruneIndex.load(shards)
    assert index.checksummed.all()
    size = os.path.getsize(shard)
    for victim in range(40, 120):  # a sample whose JPEG bytes the fingerprint never reads
        lo = int(index.offsets[victim]) + 1024
        with contextlib.suppress(AssertionError):
            pos = _outside_fingerprint(size, lo, lo + int(index.lengths[victim]) - 1536)
            break
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ 0xFF]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert idx.shard_is_stale(shard, index.metadata[0]) is None  # size, mtime, fingerprint agree
    key = index.keys[victim]
    loaded = PruneIndex.load(shards)
    ds = PrunedShardDataset(loaded)
    assert ds[victim - 1]["__key__"] == index.keys[victim - 1]
    with pytest.raises(ChecksumError, match=rf"shard {shard}: sample '{key}' .*rsprune-data index"):
        ds[victim]
    assert PrunedShardDataset(loaded, verify=False)[victim]["__key__"] == key  # the opt-out
    stream = PrunedWebDataset(loaded, ALL, shuffle_shards=False)
    with pytest.raises(ChecksumError, match=f"sample '{key}'"):
        list(stream)
    assert len(list(PrunedWebDataset(loaded, ALL, shuffle_shards=False, verify=False))) == 120
    # streams (pipe:, http) are verified on the bytes as they pass
    piped = PrunedWebDataset([f"pipe:cat {shard}"], ALL, index_dir=tmp_path, shuffle_shards=False)
    with pytest.raises(ChecksumError, match=f"sample '{key}'"):
        list(piped)


def test_map_style_dataset_checks_keys_of_shifted_ranges(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, harvey_files(10), 10)
    index_shards(shards, workers=0, progress=False)
    path = idx.index_path_for(shards[0])
    arrays, meta = idx.read_index(path)
    rolled = {k: np.roll(arrays[k], 1) for k in ("offset", "length", "checksum")}
    # ranges one sample off are no longer rising: the index is refused when it is written or read
    with pytest.raises(ConfigError, match="offset"):
        idx.write_index(path, {**arrays, **rolled}, meta)
    # keys one sample off (ranges intact): the dataset compares every key it reads
    keys = [
        bytes(arrays["key_bytes"][a:b]).decode()
        for a, b in zip(arrays["key_offsets"][:-1], arrays["key_offsets"][1:], strict=True)
    ]
    idx.write_index(path, {**arrays, **idx.encode_keys(keys[1:] + keys[:1])}, meta)
    ds = PrunedShardDataset(shards)
    with pytest.raises(
        StaleIndexError, match=r"has key .* but the index says .*rsprune-data index"
    ):
        ds[3]


def test_version_1_indexes_are_read_without_checksums_and_upgraded(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    shards = write_shards(tmp_path, harvey_files(10), 10)
    index_shards(shards, workers=0, progress=False)
    path = idx.index_path_for(shards[0])
    arrays, meta = idx.read_index(path)
    del arrays["checksum"]  # what rsprune_data 0.1 wrote: no checksums, no member layout
    arrays = {k: v for k, v in arrays.items() if not k.startswith("member_")}
    meta = {k: v for k, v in meta.items() if k != "checksum" and not k.startswith("member_")}
    meta |= {"version": "1"}
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=meta)
    idx._warned_unchecked = False
    with pytest.warns(UserWarning, match="no per-sample checksums .*rsprune-data index"):
        index = PruneIndex.load(shards)
    assert not index.checksummed.any()
    assert [s["__key__"] for s in PrunedShardDataset(index)] == list(index.keys)  # keys checked
    report = index_shards(shards, workers=0, progress=False)  # not current: rewritten, same kind
    assert report.indexed == shards
    assert PruneIndex.load(shards).checksummed.all()
