"""Outputs are published whole, interrupted runs resume, output paths are checked before any work.

Real processes killed with SIGKILL (``report``, ``pack``), real symbolic links, a real read-only
file system (a tmpfs mounted read-only; skipped where mounting is not allowed), the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import REPO, SAMPLE_DATA

from rsprune_data import ConfigError, PruneConfig, PrunedSampler, __version__
from rsprune_data._fsio import atomic_folder, atomic_write_bytes, pread_exact
from rsprune_data._validate import check_int, check_number
from rsprune_data.cli import main as cli_main
from rsprune_data.index import PruneIndex
from rsprune_data.indexer import index_shards
from rsprune_data.pack import pack_folder

HARVEY = SAMPLE_DATA / "harvey"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rsprune_data.cli", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen[bytes], ready: object, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False when it finished first."""
    t0 = time.monotonic()
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the run never reached the kill point")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- report -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("safe-shards")
    res = pack_folder(HARVEY, tmp, shard_size=100, progress=False)
    shards = [str(p) for p in res.shards]
    assert index_shards(shards, workers=0, progress=False).ok
    return shards


def test_killed_report_leaves_the_earlier_report_whole(indexed: list[str], tmp_path: Path) -> None:
    rep = tmp_path / "rep"
    base = ["report", *indexed, "-o", str(rep), "--strategy", "entropy", "-q"]
    assert cli_main([*base, "--prune-ratio", "0.5"]) == 0
    before = _tree(rep)
    assert json.loads((rep / "summary.json").read_text())["config"]["prune_ratio"] == 0.5

    def building() -> bool:  # the new report is being written into its temporary sibling
        return any(p.is_dir() and any(p.rglob("*.png")) for p in tmp_path.glob(".rep.*.tmp"))

    proc = _cli(*base, "--prune-ratio", "0.8")
    assert _kill_when(proc, building), "report finished before the kill"
    assert _tree(rep) == before  # not one file of the new ratio, none missing
    assert list(tmp_path.glob(".rep.*.tmp"))  # what the kill left ...
    assert cli_main([*base, "--prune-ratio", "0.8"]) == 0
    assert not list(tmp_path.glob(".rep.*"))  # ... is gone after the rerun
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["config"]["prune_ratio"] == 0.8
    html = (rep / "index.html").read_text()
    for name in {s.split('"')[0] for s in html.split('src="')[1:]}:
        assert (rep / name).is_file(), name


def test_report_refuses_a_folder_of_other_files(
    indexed: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    assert cli_main(["report", *indexed, "-o", str(mine), "--strategy", "entropy", "-q"]) == 2
    assert "other files" in capsys.readouterr().err
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


# --- pack ---------------------------------------------------------------------------------------
def test_pack_resumes_after_kill_9_with_identical_shards(tmp_path: Path) -> None:
    ref = pack_folder(HARVEY, tmp_path / "ref", shard_size=2, progress=False)
    out = tmp_path / "out"
    args = ["pack", str(HARVEY), str(out), "--shard-size", "2", "-q"]

    def some_shards() -> bool:
        return len(list(out.glob("shard-*.tar"))) >= 5

    killed = _kill_when(_cli(*args), some_shards)
    assert killed, "pack finished before the kill"
    manifest = json.loads((out / ".shard.pack.json").read_text())
    # the manifest may lag one shard behind the files (killed between rename and manifest write)
    assert not manifest["complete"] and 4 <= len(manifest["shards"]) < len(ref.shards)
    done = subprocess.run(
        [sys.executable, "-m", "rsprune_data.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "kept from an earlier run" in done.stdout
    assert not list(out.glob("*.partial"))
    assert _tree(out).keys() - {".shard.pack.json"} == _tree(tmp_path / "ref").keys() - {
        ".shard.pack.json"
    }
    for shard in ref.shards:  # byte for byte what an uninterrupted run writes
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    # other settings need --overwrite, which restarts from scratch
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "rsprune_data.cli",
            "pack",
            str(HARVEY),
            str(out),
            "--shard-size",
            "100",
            "-q",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert other.returncode == 2 and "--overwrite" in other.stderr
    assert (
        cli_main(["pack", str(HARVEY), str(out), "--shard-size", "100", "--overwrite", "-q"]) == 0
    )
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]


def test_pack_shard_renamed_before_the_manifest_is_rewritten(tmp_path: Path) -> None:
    """A kill between a shard's rename and the manifest update: the shard is written again."""
    out = tmp_path / "out"
    first = pack_folder(HARVEY / "bad_images", out, shard_size=10, progress=False)
    path = out / ".shard.pack.json"
    manifest = json.loads(path.read_text())
    last = manifest["shards"].pop()
    manifest["files_end"] -= last["samples"]
    manifest["complete"] = False
    path.write_text(json.dumps(manifest))
    again = pack_folder(HARVEY / "bad_images", out, shard_size=10, progress=False)
    assert again.shards == first.shards and again.resumed_shards == 3
    assert again.num_samples == first.num_samples == 40


def test_pack_symlinks_leaving_the_source_are_skipped_unless_followed(tmp_path: Path) -> None:
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "a").mkdir(parents=True)
    outside.mkdir()
    jpeg = sorted((HARVEY / "damage").iterdir())[0].read_bytes()
    (src / "a" / "own.jpg").write_bytes(jpeg)
    (outside / "secret.jpg").write_bytes(jpeg + b"secret")
    (outside / "deep").mkdir()
    (outside / "deep" / "more.jpg").write_bytes(jpeg + b"more")
    (src / "a" / "link.jpg").symlink_to(outside / "secret.jpg")
    (src / "a" / "inside.jpg").symlink_to(src / "a" / "own.jpg")  # stays inside: packed
    (src / "linked").symlink_to(outside / "deep", target_is_directory=True)
    (src / "a" / "loop").symlink_to(src, target_is_directory=True)
    res = pack_folder(src, tmp_path / "o1", progress=False)
    keys = sorted(
        s["__key__"] for s in wds.WebDataset([str(p) for p in res.shards], shardshuffle=False)
    )
    assert keys == ["a/inside", "a/own"]
    reasons = dict(res.skipped)
    assert "outside the source folder" in reasons["a/link.jpg"]
    assert "--follow-symlinks" in reasons["a/link.jpg"]
    assert "not followed" in reasons["linked/"] and "not followed" in reasons["a/loop/"]
    followed = pack_folder(src, tmp_path / "o2", progress=False, follow_symlinks=True)
    keys = sorted(
        s["__key__"] for s in wds.WebDataset([str(p) for p in followed.shards], shardshuffle=False)
    )
    assert keys == ["a/inside", "a/link", "a/own", "linked/more"]  # the loop is cut, not walked
    assert "already walked" in dict(followed.skipped)["a/loop/"]


# --- output paths, before any work --------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    ro = tmp_path / "ro"
    ro.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
            capture_output=True,
            check=False,
        ).returncode
        != 0
    ):
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_every_subcommand_checks_its_output_first(
    indexed: list[str],
    tmp_path: Path,
    readonly_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rsprune_data.centroids as centroids_mod
    import rsprune_data.encoders as encoders_mod

    def never(*_: object, **__: object) -> None:
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(encoders_mod, "load_encoder", never)
    monkeypatch.setattr(centroids_mod, "build_centroids", never)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    missing = tmp_path / "missing" / "deeper"
    ref = str(SAMPLE_DATA / "ucmerced")
    cases = [
        (["pack", str(HARVEY), str(a_file)], "is a file"),
        (["pack", str(HARVEY), str(missing)], "not an existing folder"),
        (["pack", str(HARVEY), str(readonly_dir / "out")], "cannot write"),
        (["centroids", ref, "-o", str(missing / "c.safetensors")], "not an existing folder"),
        (["centroids", ref, "-o", str(tmp_path)], "is a folder"),
        (["centroids", ref, "-o", str(readonly_dir / "c.safetensors")], "cannot write"),
        (["index", *indexed, "--index-dir", str(a_file)], "is a file"),
        (["select", *indexed, "-o", str(tmp_path)], "is a folder"),
        (["select", *indexed, "-o", str(missing / "k.txt")], "not an existing folder"),
        (["select", *indexed, "-o", str(readonly_dir / "k.txt")], "cannot write"),
        (["report", *indexed, "-o", str(a_file)], "is a file"),
        (["report", *indexed, "-o", str(missing)], "not an existing folder"),
        (["report", *indexed, "-o", str(readonly_dir / "rep")], "cannot write"),
        (["demo", "--out", str(a_file)], "is a file"),
    ]
    for argv, says in cases:
        assert cli_main([*argv, "-q"]) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (argv, err)
    assert a_file.read_text() == "x" and not missing.parent.exists()


def test_rgb_bands_checked_before_work(
    indexed: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "idx"
    assert (
        cli_main(["index", *indexed, "--index-dir", str(out), "--rgb-bands", "0", "1", "-2", "-q"])
        == 2
    )
    assert "rgb_bands" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match="rgb_bands"):
        index_shards(
            indexed,
            index_dir=out,
            rgb_bands=(0, 1),  # type: ignore[arg-type]
            workers=2,
            progress=False,
        )
    assert not out.exists()


def test_select_keys_with_line_breaks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jpeg = sorted((HARVEY / "damage").iterdir())[0].read_bytes()
    shard = tmp_path / "odd-000000.tar"
    keys = ["plain", "two\nlines", "cr\rkey"]
    with wds.TarWriter(str(shard), encoder=False) as w:
        for i, k in enumerate(keys):
            w.write({"__key__": k, "jpg": jpeg + bytes([i])})
    assert index_shards([str(shard)], workers=0, progress=False).ok
    assert sorted(PruneIndex.load([str(shard)]).keys) == sorted(keys)
    cfg = [
        "--prune-ratio",
        "0",
        "--no-entropy-filter",
        "--max-nodata",
        "-1",
        "--strategy",
        "entropy",
    ]
    txt = tmp_path / "keys.txt"
    assert cli_main(["select", str(shard), *cfg, "-o", str(txt)]) == 2
    err = capsys.readouterr().err
    assert "line break" in err and "keys.json" in err and not txt.exists()
    js = tmp_path / "keys.json"
    assert cli_main(["select", str(shard), *cfg, "-o", str(js)]) == 0
    assert sorted(json.loads(js.read_text())) == sorted(keys)


# --- numbers, helpers, version ------------------------------------------------------------------
def test_numpy_scalars_are_numbers_and_bools_are_not() -> None:
    cfg = PruneConfig(prune_ratio=np.float32(0.5), entropy_keep=np.float64(0.3), seed=np.int64(2))
    assert cfg == PruneConfig(prune_ratio=0.5, entropy_keep=0.3, seed=2)
    assert type(cfg.prune_ratio) is float and type(cfg.seed) is int
    assert PruneConfig(prune_ratio=np.float32(0.85)) == PruneConfig(prune_ratio=0.85)
    assert check_number("x", np.int32(3), 0, 5) == 3.0 and check_int("n", np.uint8(7), 0) == 7
    for bad in (True, np.bool_(True), np.float32("nan"), "0.5", None):
        with pytest.raises(ConfigError):
            check_number("x", bad, 0, 1)
    with pytest.raises(ConfigError, match="integer >= 0"):
        check_int("n", np.bool_(False), 0)
    index = PruneIndex.from_arrays(
        np.linspace(1, 7, 20), np.arange(20) % 4, np.linspace(0.1, 0.9, 20), num_clusters=4
    )
    s = PrunedSampler(index, np.float32(0.5), shuffle=False)
    s.set_prune_ratio(np.float32(0.25))
    assert s.config.prune_ratio == 0.25


def test_atomic_folder_keeps_the_old_folder_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    atomic_write_bytes(out / "a.txt", b"new")
    assert (out / "a.txt").read_bytes() == b"new" and len(list(out.iterdir())) == 1


def test_pread_exact_loops_over_short_reads(tmp_path: Path) -> None:
    """A pipe returns short reads; pread_exact must not; a real file stops only at its end."""
    path = tmp_path / "blob"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_exact(fd, len(data), 0) == data
        assert pread_exact(fd, 100, len(data) - 10) == data[-10:]
        assert pread_exact(fd, 5, len(data) + 10) == b""
    finally:
        os.close(fd)


def test_version_is_defined_once() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rsprune_data.cli", "--version"],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["rsprune-data", __version__]
    hits = [p for p in (REPO / "rsprune_data").rglob("*.py") if __version__ in p.read_text()]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '\nversion = "' not in pyproject and 'dynamic = ["version"]' in pyproject
    assert [p.name for p in hits] == ["_version.py"]
