"""Speed of `select_indices` on a Git-10M-sized synthetic index, against one `np.argsort`.

    python benchmarks/selection_speed.py [--n 10500000] [--k 200] [--out results/selection_speed.json]

Prints, per prune ratio, the seconds and peak extra memory of the selection and its ratio to one
`np.argsort` of N float32 measured in the same run (best of --repeat). Target: <= 0.5x, aim 0.3x.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from rsprune_data import select_indices


def best_of(fn, repeat: int) -> tuple[float, int]:
    times, peak = [], 0
    for _ in range(repeat):
        tracemalloc.start()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return min(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_500_000)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.9])
    ap.add_argument("--out", type=Path, default=Path("results/selection_speed.json"))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, k = args.n, args.k
    entropy = (rng.random(n, dtype=np.float32) * 8).astype(np.float32)
    # skewed cluster sizes (Zipf-like), as real pools are imbalanced
    weights = 1.0 / np.arange(1, k + 1)
    cluster_ids = rng.choice(k, size=n, p=weights / weights.sum()).astype(np.int16)
    similarity = rng.random(n, dtype=np.float32)
    valid = rng.random(n) > 0.01

    yard, yard_mem = best_of(lambda: np.argsort(similarity), args.repeat)
    print(
        f"N={n:,} K={k}  yardstick np.argsort(float32): {yard:.3f} s, peak {yard_mem / 2**20:.0f} MiB"
    )
    rows = []
    for ratio in args.ratios:
        for label, kw in (("no Stage I", {}), ("entropy_keep=0.3", {"entropy_keep": 0.3})):

            def run(kw=kw, ratio=ratio):
                return select_indices(
                    entropy,
                    cluster_ids,
                    similarity,
                    num_clusters=k,
                    prune_ratio=ratio,
                    valid=valid,
                    **kw,
                )

            sec, mem = best_of(run, args.repeat)
            kept = len(run())
            rows.append(
                {
                    "prune_ratio": ratio,
                    "stage1": label,
                    "seconds": sec,
                    "peak_mib": mem / 2**20,
                    "ratio_to_argsort": sec / yard,
                    "kept": kept,
                }
            )
            print(
                f"ratio {ratio:<5} {label:<17} {sec:6.3f} s  {sec / yard:5.2f}x argsort  "
                f"peak {mem / 2**20:6.0f} MiB  kept {kept:,}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"n": n, "k": k, "argsort_seconds": yard, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
