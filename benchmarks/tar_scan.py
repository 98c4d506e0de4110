"""Walking tar shards: `tario.scan_tar` / `iter_tar_samples` against Python's `tarfile` and webdataset.

    python benchmarks/tar_scan.py [--samples 1000 10000] [--out results/tar_scan.json]

Writes shards of small real JPEG members with webdataset's ``TarWriter`` (which adds a pax header
before every member), then times, best of ``--repeat``: ``scan_tar`` (header walk, data skipped),
``tarfile.open().getmembers()`` (the yardstick), ``tarfile`` streaming mode, ``iter_tar_samples``
(reads all data) and ``webdataset.WebDataset`` iteration. Prints members/s and the ratio to tarfile.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from rsprune_data.tario import iter_tar_samples, scan_tar


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_shard(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path), encoder=False) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                buf, format="JPEG"
            )
            w.write({"__key__": f"{i:08d}", "jpg": buf.getvalue()})


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/tar_scan.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.samples:
            path = Path(tmp) / f"bench{n}.tar"
            make_shard(path, n)

            def getmembers(p: Path = path) -> int:
                with tarfile.open(p) as t:
                    return len(t.getmembers())

            def stream(p: Path = path) -> int:
                with open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
                    return sum(1 for _ in t)

            cases = {
                "tarfile.open().getmembers()": getmembers,
                "scan_tar": lambda p=path: scan_tar(p),
                "tarfile streaming (r|)": stream,
                "iter_tar_samples (reads data)": lambda p=path: list(iter_tar_samples(p)),
                "webdataset.WebDataset": lambda p=path: list(
                    wds.WebDataset(str(p), shardshuffle=False)
                ),
            }
            times = {name: best(fn, args.repeat) for name, fn in cases.items()}
            yard = times["tarfile.open().getmembers()"]
            print(f"shard of {n:,} samples ({path.stat().st_size / 1e6:.1f} MB)")
            for name, t in times.items():
                print(
                    f"  {name:30s} {t * 1e3:8.1f} ms  {n / t:10,.0f} samples/s  {yard / t:5.1f}x tarfile"
                )
                rows.append(
                    {"samples": n, "case": name, "seconds": t, "ratio_to_tarfile": yard / t}
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
