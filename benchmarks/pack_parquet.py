"""Packing a Parquet corpus into tar shards (`pack_table`) against a bare pyarrow read of the same files.

    python benchmarks/pack_parquet.py [--src ../shared/data/harvey] [--images 8000] [--files 4] [--row-group 512] \
        [--shard-size 1000] [--repeat 3] [--out results/pack_parquet.json]

Builds Parquet files in Git-10M's schema (``image`` bytes, ``img_quality_score``, ``resolution``,
``Google_location``, ``caption``) from the Harvey JPEGs of ``--src`` (default ``../shared/data/harvey``,
or ``examples/data`` when absent), then times, best of ``--repeat`` with the spread: the yardstick,
a bare pyarrow read of the same columns in the same batches with every row turned into Python
objects (``ParquetFile.iter_batches(...).to_pylist()``, what any per-sample writer must do at
least), a hand-written loop of the same rows into webdataset's ``ShardWriter`` (same members,
no fsync, not resumable), and ``pack_table`` with ``workers`` 1 and 2 (tar writing, JSON metadata, ``.txt``
captions, fsync and rename per shard). Prints rows/s, MB/s and the ratio pack / bare read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsprune_data.pack_table import BATCH_ROWS, pack_table

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["image", "img_quality_score", "resolution", "Google_location", "caption"]


def timings(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def build(folder: Path, n: int, files: int, row_group: int, root: Path) -> int:
    if not root.is_dir():
        root = REPO / "examples" / "data" / "harvey"
    paths = sorted(root.rglob("*.jpeg"))
    paths = [paths[i % len(paths)] for i in range(n)]
    rng = np.random.default_rng(0)
    total = 0
    for f in range(files):
        part = paths[f * n // files : (f + 1) * n // files]
        blobs = [p.read_bytes() for p in part]
        total += sum(map(len, blobs))
        m = len(part)
        t = pa.table(
            {
                "image": pa.array(blobs, pa.binary()),
                "img_quality_score": pa.array(rng.uniform(0, 1, m), pa.float32()),
                "resolution": pa.array(rng.choice([0.3, 0.5, 1.0], m)),
                "Google_location": [
                    f"{rng.uniform(-90, 90):.5f},{rng.uniform(-180, 180):.5f}" for _ in range(m)
                ],
                "caption": [f"a satellite image of {p.parent.name}" for p in part],
            }
        )
        pq.write_table(
            t, folder / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=row_group
        )
    return total


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--src",
        type=Path,
        default=REPO.parent / "shared" / "data" / "harvey",
        help="JPEGs to build the Parquet files from (examples/data when missing)",
    )
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--row-group", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/pack_parquet.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        nbytes = build(src, a.images, a.files, a.row_group, a.src)
        files = sorted(src.glob("*.parquet"))

        def bare() -> int:
            rows = 0
            for f in files:
                for b in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS):
                    rows += len(b.to_pylist())
            return rows

        def by_hand() -> int:  # what one writes without pack_table: rows -> webdataset TarWriter
            import webdataset as wds

            out = Path(tmp) / "hand"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            n = 0
            with wds.ShardWriter(
                str(out / "s-%06d.tar"), maxcount=a.shard_size, verbose=0, encoder=False, mtime=0.0
            ) as w:
                for f in files:
                    for b in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS):
                        for rec in b.to_pylist():
                            meta = {c: rec[c] for c in COLUMNS[1:]}
                            w.write(
                                {
                                    "__key__": f"{f.stem}-{n}",
                                    "jpg": rec["image"],
                                    "json": json.dumps(meta).encode(),
                                    "txt": rec["caption"].encode(),
                                }
                            )
                            n += 1
            return n

        def pack(workers: int) -> Callable[[], object]:
            def run() -> object:
                out = Path(tmp) / "out"
                shutil.rmtree(out, ignore_errors=True)
                return pack_table(
                    str(src / "*.parquet"),
                    out,
                    keep_columns=COLUMNS[1:],
                    caption_column="caption",
                    shard_size=a.shard_size,
                    workers=workers,
                    progress=False,
                )

            return run

        assert bare() == a.images
        results = {
            "bare pyarrow read": timings(bare, a.repeat),
            "by hand: webdataset ShardWriter": timings(by_hand, a.repeat),
        }
        for w in (1, 2):
            results[f"pack_table workers={w}"] = timings(pack(w), a.repeat)
    base = min(results["bare pyarrow read"])
    rows = []
    print(
        f"{a.images} rows, {nbytes / 1e6:.1f} MB of JPEG in {a.files} Parquet files "
        f"(row groups of {a.row_group}); best of {a.repeat} (spread); 2-core shared machine"
    )
    for name, ts in results.items():
        t = min(ts)
        row = {
            "what": name,
            "best_s": t,
            "max_s": max(ts),
            "rows_per_s": a.images / t,
            "mb_per_s": nbytes / 1e6 / t,
            "ratio_to_bare_read": t / base,
        }
        rows.append(row)
        print(
            f"  {name:32s} {t:6.3f} s (up to {max(ts):.3f})  {a.images / t:9.0f} rows/s  "
            f"{nbytes / 1e6 / t:7.1f} MB/s  {t / base:5.2f}x the bare read's time"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "images": a.images,
                "bytes": nbytes,
                "files": a.files,
                "row_group": a.row_group,
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
