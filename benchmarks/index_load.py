"""How fast ``PruneIndex.load`` joins many shard indexes, against a bare safetensors load.

Writes ``--shards`` synthetic shard indexes of ``--samples`` samples each (plus a tiny stand-in
file per shard, so the stale check runs its ``stat``), then times in the same run, best of
``--repeat`` after one warm-up:

* baseline: ``safetensors.numpy.load_file`` of every index file (all tensors, no joining);
* ``PruneIndex.load(shards)``: header checks, stale checks, all sample columns joined;
* the same followed by the first ``.keys`` access (keys are loaded lazily).

Target: ``PruneIndex.load`` within 2x of the baseline. Results go to stdout and, with ``--out``,
to a JSON file and a PNG bar chart beside it.

Usage::

    python benchmarks/index_load.py --shards 1000 --samples 10000 --out results/index_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rsprune_data.index import PruneIndex, encode_keys, index_path_for, shard_metadata, write_index


def write_synthetic(folder: Path, num_shards: int, samples: int, k: int, seed: int) -> list[str]:
    """Stand-in shard files and their indexes; returns the shard paths in order."""
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(num_shards):
        shard = folder / f"shard-{s:06d}.tar"
        lengths = rng.integers(20_000, 400_000, samples, dtype=np.int64)
        # only stat/fingerprint look at the shard: a sparse file as long as its byte ranges, so
        # the index's ranges lie inside it (PruneIndex.load checks that)
        shard.write_bytes(s.to_bytes(4, "little") * 256)
        os.truncate(shard, int(lengths.sum()))
        valid = (rng.uniform(size=samples) > 0.001).astype(np.uint8)
        arrays = {
            "entropy": rng.uniform(0, 8, samples).astype(np.float32),
            "nodata": rng.uniform(0, 0.2, samples).astype(np.float32),
            "cluster_id": rng.integers(0, k, samples).astype(np.int16),
            "similarity": rng.uniform(0, 1, samples).astype(np.float32),
            "valid": valid,
            "reason": (1 - valid).astype(np.uint8),  # an invalid sample carries its reason
            "offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
            "length": lengths,
            **encode_keys([f"{s:06d}/{i:08d}" for i in range(samples)]),
        }
        meta = {
            **shard_metadata(shard),
            "encoder": "efficientnet-lite0",
            "centroids_digest": "0" * 32,
            "num_clusters": str(k),
            "reasons": '["decode_error"]',
        }
        write_index(index_path_for(shard), arrays, meta)
        shards.append(str(shard))
    return shards


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Best wall time of ``repeat`` runs after one warm-up run (page cache warm for all)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.numpy import load_file

    t = time.perf_counter()
    shards = write_synthetic(folder, args.shards, args.samples, args.clusters, args.seed)
    write_s = time.perf_counter() - t
    paths = [index_path_for(s) for s in shards]
    index_bytes = sum(p.stat().st_size for p in paths)
    n = args.shards * args.samples

    def keys() -> None:
        _ = PruneIndex.load(shards).keys[n - 1]

    timings = {
        "bare_safetensors_s": best_of(lambda: [load_file(p) for p in paths], args.repeat),
        "prune_index_load_s": best_of(lambda: PruneIndex.load(shards), args.repeat),
        "load_plus_keys_s": best_of(keys, args.repeat),
    }
    return {
        "shards": args.shards,
        "samples_per_shard": args.samples,
        "samples": n,
        "index_bytes": index_bytes,
        "index_bytes_per_sample": index_bytes / n,
        "write_s": write_s,
        **timings,
        "ratio_load_vs_bare": timings["prune_index_load_s"] / timings["bare_safetensors_s"],
        "ratio_load_plus_keys_vs_bare": timings["load_plus_keys_s"] / timings["bare_safetensors_s"],
        "target_ratio": 2.0,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["bare safetensors", "PruneIndex.load", "load + keys"]
    values = [result[k] for k in ("bare_safetensors_s", "prune_index_load_s", "load_plus_keys_s")]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, values, color=["#999999", "#1f77b4", "#aec7e8"])
    ax.axvline(2 * values[0], color="red", linestyle="--", label="2x baseline (target)")
    ax.set_xlabel("seconds (best of repeats)")
    ax.set_title(f"{result['shards']} shard indexes x {result['samples_per_shard']} samples")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--samples", type=int, default=10_000, help="samples per shard")
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="write the synthetic indexes here (kept); default: a temp dir")
    p.add_argument("--out", help="write results as JSON here, and a PNG chart beside it")
    args = p.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rsprune-index-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = run(folder, args)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        f"{result['samples']:,} samples in {result['shards']} shard indexes, "
        f"{result['index_bytes_per_sample']:.1f} index bytes/sample"
    )
    print(f"bare safetensors load : {result['bare_safetensors_s']:.3f} s")
    print(
        f"PruneIndex.load       : {result['prune_index_load_s']:.3f} s  "
        f"ratio {result['ratio_load_vs_bare']:.2f}x (target <= 2x)"
    )
    print(
        f"load + first .keys    : {result['load_plus_keys_s']:.3f} s  "
        f"ratio {result['ratio_load_plus_keys_vs_bare']:.2f}x"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
