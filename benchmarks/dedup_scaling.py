"""Scaling of near-duplicate removal (:mod:`rsprune_data.dedup`) on synthetic embeddings.

    python benchmarks/dedup_scaling.py [--sizes 100000 300000 1000000] [--dim 128] [--k 200]
        [--tau 0.95] [--copies 0.1] [--exact-up-to 300000] [--repeats 1] [--out results]

Pools: ``K`` clusters of unit rows (cosine ~0.7 to their centre) plus a ``--copies`` share of planted
near copies (cosine 0.95-0.9999 to a random original). For every size the default sub-quadratic
path is timed (best of ``--repeats``); up to ``--exact-up-to`` samples the exact all-pairs pass
(``exact_max=None``, O(m^2) per cluster) runs in the same process as the yardstick, and the recall of
its duplicates by the default path is reported. The criterion: time(1M) <= 12 x time(100k).

This is a shared 2-core machine: absolute times move with the load; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def pool(
    n: int, d: int, k: int, copies: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, n])
    centers = rng.standard_normal((k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    z = rng.integers(0, k, n)
    x = centers[z] + rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    nc = int(n * copies)
    src = rng.integers(0, n - nc, nc)
    noise = rng.uniform(0.01, 0.3, (nc, 1)).astype(np.float32) / np.sqrt(d)
    x[n - nc :] = x[src] + noise * rng.standard_normal((nc, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    from rsprune_data.centroids import assign

    zz, s = assign(x, centers)
    return x.astype(np.float16), zz, s


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--copies", type=float, default=0.1)
    ap.add_argument("--exact-up-to", type=int, default=300_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results"))
    a = ap.parse_args()
    from rsprune_data.dedup import near_duplicates

    rows = []
    for n in a.sizes:
        x, z, s = pool(n, a.dim, a.k, a.copies, 0)
        t, dup = timed(lambda x=x, z=z, s=s: near_duplicates(x, z, s, a.tau), a.repeats)
        row: dict[str, Any] = {
            "n": n,
            "seconds": t,
            "duplicates": int((dup >= 0).sum()),
            "load_avg": os.getloadavg()[0],
        }
        if n <= a.exact_up_to:
            te, ex = timed(lambda x=x, z=z, s=s: near_duplicates(x, z, s, a.tau, exact_max=None), 1)
            found = int(((dup >= 0) & (ex >= 0)).sum())
            row.update(
                exact_seconds=te,
                exact_duplicates=int((ex >= 0).sum()),
                recall=found / max(1, int((ex >= 0).sum())),
                same_decisions=float((dup == ex).mean()),
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["ratio_to_first"] = r["seconds"] / base
    res = {
        "command": "python " + " ".join(sys.argv),
        "dim": a.dim,
        "k": a.k,
        "tau": a.tau,
        "copies": a.copies,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    for r in rows:
        ex = (
            f"; exact {r['exact_seconds']:.1f} s, recall {r['recall']:.4f}" if "recall" in r else ""
        )
        print(
            f"n={r['n']:>9,}: {r['seconds']:7.1f} s (x{r['ratio_to_first']:.1f} of n={rows[0]['n']:,}), "
            f"{r['duplicates']:,} duplicates{ex}; load {r['load_avg']:.1f} on {os.cpu_count()} cores"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "dedup_scaling.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
