"""Cold random reads of one device: O_DIRECT against buffered reads, at several depths.

    python benchmarks/direct_io.py [--cache /tmp/rsprune_bench] [--reads 900] [--size 8192]
        [--depths 1 4 16 64] [--repeat 3] [--out results/direct_io.json]

Why ``readahead="direct"`` (``rsprune_data.reading.local``) is slower than ``"planned"`` on some
machines although it reads fewer bytes: ``--reads`` reads of ``--size`` bytes at random 512-byte
aligned offsets of the shards ``benchmarks/streaming_io.py`` packs (run it once first), in file
order, the page cache emptied before each pass (``drop_caches`` where allowed, else
``POSIX_FADV_DONTNEED`` per file). Microseconds per read, best of ``--repeat``:

* ``direct, depth d``: ``O_DIRECT`` + ``preadv`` into page-aligned buffers on ``d`` threads
  (depth 1: in this thread);
* ``buffered, WILLNEED 16 ahead``: what ``readahead="planned"`` does (``POSIX_FADV_RANDOM``,
  ``POSIX_FADV_WILLNEED`` for the read 16 ahead, then ``pread``);
* ``buffered, plain``: ``pread`` with ``POSIX_FADV_RANDOM``, one at a time.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming_io import drop_caches_allowed, evict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rsprune_bench"))
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--reads", type=int, default=900)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/direct_io.json"))
    a = ap.parse_args()
    shards = sorted(str(p) for p in (a.cache / f"shards-{a.shard_size}").glob("shard-*.tar"))
    if not shards:
        raise SystemExit(f"no shards under {a.cache}: run benchmarks/streaming_io.py first")
    rng = np.random.default_rng(0)
    jobs: list[tuple[str, int]] = []
    per = max(1, a.reads // len(shards))
    for s in shards:
        blocks = (os.path.getsize(s) - a.size) // 512
        jobs += [(s, int(o) * 512) for o in np.sort(rng.choice(blocks, per, replace=False))]
    dropped = drop_caches_allowed()
    direct = {s: os.open(s, os.O_RDONLY | os.O_DIRECT) for s in shards}
    plain = {s: os.open(s, os.O_RDONLY) for s in shards}
    for fd in plain.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read_direct(job: tuple[str, int]) -> int:
        buf = mmap.mmap(-1, a.size)
        try:
            return os.preadv(direct[job[0]], [buf], job[1])
        finally:
            buf.close()

    def willneed() -> None:
        for i, (s, o) in enumerate(jobs):
            if i + 16 < len(jobs):
                s2, o2 = jobs[i + 16]
                os.posix_fadvise(plain[s2], o2, a.size, os.POSIX_FADV_WILLNEED)
            os.pread(plain[s], a.size, o)

    def depth(d: int) -> Any:
        if d == 1:
            return lambda: [read_direct(j) for j in jobs]

        def run() -> None:
            with ThreadPoolExecutor(d) as pool:
                list(pool.map(read_direct, jobs))

        return run

    cases: list[tuple[str, Any]] = [(f"direct, depth {d}", depth(d)) for d in a.depths]
    cases += [
        ("buffered, WILLNEED 16 ahead", willneed),
        ("buffered, plain", lambda: [os.pread(plain[s], a.size, o) for s, o in jobs]),
    ]
    res: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "reads": len(jobs),
        "size": a.size,
        "cold": "drop_caches" if dropped else "fadvise(DONTNEED)",
    }
    for name, fn in cases:
        best = float("inf")
        for _ in range(a.repeat):
            evict(shards, drop_caches=dropped)
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        res[name] = best / len(jobs) * 1e6
        print(f"{name:30s} {res[name]:7.1f} us per read (best of {a.repeat})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
