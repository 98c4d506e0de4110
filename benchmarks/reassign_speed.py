"""Throughput of ``reassign`` (stored float16 embeddings -> new cluster ids) against re-encoding.

    python benchmarks/reassign_speed.py [--samples 200000] [--shards 20] [--dim 1280] [--k 200]
        [--repeats 3] [--encode-images 64] [--images] [--widen-variants] [--out results]

Measured in one run, best of ``--repeats`` with the spread:

1. the assignment kernel alone on ``[n, d]`` float16 rows (float16 -> float32, product, argmax):
   ``centroids.assign`` (the yardstick: numpy's product, what ``reassign`` and the indexer use),
   torch float32 and faiss ``IndexFlatIP`` (each widening all rows first);
2. ``reassign_shards`` end to end over ``--shards`` synthetic sidecars + indexes (read, validate the
   digest, assign, write the index atomically), in samples/s;
3. the re-encoding it replaces: the default encoder (EfficientNet-Lite0, 224 px) on
   ``--encode-images`` shipped tiles, decode + preprocess + forward, in images/s; the ratio is printed.

``--images`` also counts, on the shipped images (``examples/data``: 300 Harvey tiles against K = 20
centroids of the 105 UC Merced tiles), how many cluster ids assigning from the float16 canonical
representation changes against assigning from float32.

This is a shared 2-core machine: figures move with the load; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), max(times)


def kernels(emb16: np.ndarray, cents: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    import faiss
    import torch

    from rsprune_data.centroids import assign

    n = emb16.shape[0]
    ct = torch.from_numpy(cents)

    def torch_f32() -> None:
        for lo in range(0, n, 65536):
            s = torch.from_numpy(emb16[lo : lo + 65536]).float() @ ct.T
            s.max(dim=1)

    flat = faiss.IndexFlatIP(cents.shape[1])
    flat.add(cents)
    out = {}
    for name, fn in (
        # what reassign runs: float16 rows, widened per chunk
        ("numpy", lambda: assign(emb16, cents)),
        ("torch_f32", torch_f32),
        ("faiss_flat_ip", lambda: flat.search(emb16.astype(np.float32), 1)),
    ):
        best, worst = best_of(fn, repeats)
        out[name] = {"samples_per_s": n / best, "worst_samples_per_s": n / worst}
    return out


def end_to_end(
    emb16: np.ndarray, cents: Any, shards: int, repeats: int, tmp: Path
) -> dict[str, float]:
    from rsprune_data import index as idx
    from rsprune_data.embeddings import sidecar_path_for, write_sidecar
    from rsprune_data.reassign import reassign_shards

    n, names = emb16.shape[0], []
    for s, part in enumerate(np.array_split(np.arange(n), shards)):
        shard = tmp / f"syn-{s:06d}.tar"
        m = part.size
        shard.write_bytes(b"\0" * (512 * m))  # stands in for the tar: reassign never reads it
        meta = idx.shard_metadata(shard)
        arrays = {
            "entropy": np.full(m, 6.0),
            "nodata": np.zeros(m),
            "cluster_id": np.zeros(m),
            "similarity": np.zeros(m),
            "valid": np.ones(m),
            "reason": np.zeros(m),
            "offset": np.arange(m) * 512,
            "length": np.full(m, 512),
            **idx.encode_keys([f"k{i}" for i in part]),
        }
        idx.write_index(
            idx.index_path_for(shard),
            arrays,
            {
                **meta,
                "encoder": cents.encoder,
                "centroids_digest": "x",
                "num_clusters": "1",
                "reasons": "[]",
            },
        )
        write_sidecar(
            sidecar_path_for(shard),
            emb16[part],
            np.ones(m, bool),
            shard_meta=meta,
            encoder=cents.encoder,
        )
        names.append(str(shard))
    best, worst = best_of(lambda: reassign_shards(names, cents, progress=False), repeats)
    return {"samples_per_s": n / best, "worst_samples_per_s": n / worst, "seconds": best}


def widen_variants(emb16: np.ndarray, cents: Any, shards: int, repeats: int) -> dict[str, Any]:
    """``reassign`` end to end with other ways of widening the float16 rows (the library widens
    with torch's copy on one thread; see ``centroids._assign_numpy``)."""
    import contextlib

    import torch

    import rsprune_data.centroids as cmod

    @contextlib.contextmanager
    def torch_all_threads(wide: Any, dtype: Any) -> Any:
        target = torch.from_numpy(wide)
        yield lambda x: target[: x.shape[0]].copy_(torch.from_numpy(np.ascontiguousarray(x)))

    @contextlib.contextmanager
    def numpy_copyto(wide: Any, dtype: Any) -> Any:
        yield lambda x: np.copyto(wide[: x.shape[0]], x, casting="unsafe")

    out = {}
    real = cmod._widener
    for name, widener in (
        ("torch, one thread (the library)", real),
        (f"torch, {torch.get_num_threads()} threads", torch_all_threads),
        ("numpy copyto", numpy_copyto),
    ):
        cmod._widener = widener  # type: ignore[assignment]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out[name] = end_to_end(emb16, cents, shards, repeats, Path(tmp))
        finally:
            cmod._widener = real
    return out


def encode_rate(count: int, repeats: int) -> float:
    import torch

    from rsprune_data.encoders import load_encoder
    from rsprune_data.images import decode_rgb

    enc = load_encoder("efficientnet-lite0", device="cpu")
    files = sorted((REPO / "examples" / "data" / "harvey").rglob("*.jpeg"))[:count]
    blobs = [f.read_bytes() for f in files]

    def run() -> None:
        batch = torch.stack([enc.preprocess(decode_rgb(b, "jpeg")) for b in blobs])
        enc.encode(batch)

    best, _ = best_of(run, repeats)
    return len(blobs) / best


def float16_flips() -> dict[str, Any]:
    from rsprune_data.centroids import assign, build_centroids, embed_images
    from rsprune_data.embeddings import canonical
    from rsprune_data.encoders import load_encoder

    enc = load_encoder("efficientnet-lite0", device="cpu")
    cents = build_centroids([REPO / "examples" / "data" / "ucmerced"], enc, k=20, progress=False)
    files = sorted((REPO / "examples" / "data" / "harvey").rglob("*.jpeg"))
    emb = embed_images(files, enc, progress=False, skip_corrupt=True)
    emb = emb[np.any(emb != 0, axis=1)]
    z32, s32 = assign(emb, cents)
    z16, s16 = assign(canonical(emb).astype(np.float32), cents)
    return {
        "images": int(emb.shape[0]),
        "k": 20,
        "ids_changed": int((z32 != z16).sum()),
        "max_cos_change": float(np.abs(s32 - s16).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encode-images", type=int, default=64)
    ap.add_argument("--images", action="store_true", help="count float16 vs float32 id changes")
    ap.add_argument(
        "--widen-variants",
        action="store_true",
        help="also run reassign with other float16 -> float32 widenings (torch on all threads, "
        "numpy copyto)",
    )
    ap.add_argument("--out", type=Path, default=Path("results"))
    a = ap.parse_args()
    from rsprune_data.centroids import Centroids
    from rsprune_data.embeddings import canonical

    rng = np.random.default_rng(0)
    mu = canonical(rng.standard_normal((a.k, a.dim))).astype(np.float32)
    cents = Centroids(
        centroids=mu,
        encoder="synthetic",
        seed=0,
        ref_dirs=["synthetic"],
        ref_counts=[a.k],
        class_names=["x"],
        composition=np.ones((a.k, 1)),
    )
    z = rng.integers(0, a.k, a.samples)
    emb16 = canonical(mu[z] + 0.05 * rng.standard_normal((a.samples, a.dim), np.float32))
    res: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "samples": a.samples,
        "dim": a.dim,
        "k": a.k,
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    res["kernels"] = kernels(emb16, mu, a.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        res["reassign"] = end_to_end(emb16, cents, a.shards, a.repeats, Path(tmp))
    if a.widen_variants:
        res["widen_variants"] = widen_variants(emb16, cents, a.shards, a.repeats)
    res["encode_images_per_s"] = encode_rate(a.encode_images, a.repeats)
    res["speedup_vs_reencoding"] = res["reassign"]["samples_per_s"] / res["encode_images_per_s"]
    if a.images:
        res["float16_vs_float32"] = float16_flips()
    for name, r in res["kernels"].items():
        print(
            f"kernel {name:14s} {r['samples_per_s']:>12,.0f} samples/s (worst {r['worst_samples_per_s']:,.0f}); "
            f"x{r['samples_per_s'] / res['kernels']['numpy']['samples_per_s']:.2f} of numpy"
        )
    r = res["reassign"]
    print(
        f"reassign end to end {r['samples_per_s']:,.0f} samples/s (worst {r['worst_samples_per_s']:,.0f}) "
        f"over {a.shards} shards; re-encoding {res['encode_images_per_s']:.1f} images/s -> "
        f"x{res['speedup_vs_reencoding']:,.0f}; load average {res['load_avg'][0]:.1f} on "
        f"{os.cpu_count()} cores"
    )
    for name, r in res.get("widen_variants", {}).items():
        print(
            f"reassign end to end, widening by {name}: {r['samples_per_s']:,.0f} samples/s "
            f"(worst {r['worst_samples_per_s']:,.0f})"
        )
    if a.images:
        print(f"float16 vs float32 assignment on the shipped images: {res['float16_vs_float32']}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "reassign_speed.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
