"""Quality of the selected subsets: RS-Prune against its baselines, and Stage I rules on pools of other make-up.

    python benchmarks/quality.py [--cache /tmp/rsprune_quality] [--out results] \
        [--ratios 0.5 0.7 0.85 0.9] [--seeds 5] [--image-size 224] [--skip-mixes]

Reference = ``../shared/data/ucmerced`` (labelled, 21 classes), pool = ``../shared/data/harvey``
(unlabelled for the library: its folder names ``damage``, ``no_damage`` and ``bad_images`` are hidden
labels that only this benchmark reads). The real pipeline runs once and is cached under ``--cache``:
``pack_folder`` -> ``build_centroids`` (default encoder, K = 200) -> ``index_shards``. The indexer's own
encoder calls are tapped, so every tile is embedded exactly once; the tap is checked against the
cluster ids the indexer wrote.

Part 1 (issue 4), pool = Harvey: every strategy (``rsprune`` with the default data-driven Stage I, the
paper's fixed ``entropy_keep=0.3``, ``entropy``, ``stratified``, ``nearest``, ``moderate``, ``random``
over ``--seeds`` seeds, and the paper's ablation that clusters the unlabelled pool itself with
spherical k-means, K = 200, then samples stratified, without and with Stage I) at every ratio. Metrics
of each subset:

- low-information share: fraction of the selected tiles from ``bad_images``;
- coverage: reference clusters with at least one selected tile, and the normalised entropy of the
  occupancy of the K reference clusters (1 = perfectly balanced);
- representativeness, in the encoder's space *and* in a space the selection never used (colour
  histograms + scikit-image uniform LBP histograms), both projected to ``--pca-dims`` principal
  components fitted on pool + reference: Frechet distance between the subset and the reference set
  (the expert-curated target), and the k-center cover radius of the subset over the valid pool (the
  distance from the worst-covered pool tile to the subset), over all valid tiles and over the tiles
  that are not ``bad_images``;
- selection time (``select_with_config``, best of 3).

Part 2 (issue 3), Stage I rules (``auto`` = the default, ``keep0.3``/``keep0.5``/``keep0.7`` = fixed
fractions, ``none`` = no entropy filter but ``max_nodata``, ``off`` = no Stage I at all) under
``strategy="rsprune"`` on pools of different make-up: Harvey, UC Merced itself, UC Merced + Harvey
50/50 and 20/80 by count, and a no-data-heavy pool (all 631 ``bad_images`` + good Harvey tiles, ~40%
no-data). Extra metrics: normalised entropy of the hidden-class occupancy, and per UC Merced class the
ratio of its share of the selection to its share of the pool (a class "keeps its share" at >= 0.5,
is "lost" below 0.1).

Part 3 (issue 12, ``--cloud``, runs alone in a minute or two): the opt-in cloud/haze rule
``max_cloud`` on the Stage I survivors of Harvey and UC Merced (``benchmarks/_cloud_tradeoff.py``):
``bad_images`` removed against good Harvey and UC Merced tiles removed, per threshold; writes
``quality_cloud.json`` and ``quality_cloud.md``.

Outputs under ``--out``: ``quality.json``, ``quality_makeup_<pool>.json``, ``quality_<metric>.png``
(strategies as lines over the ratio, random as mean with a +-1 std band), ``quality_makeup_<metric>.png``
and ``quality_table_085.md`` (also printed). A fresh run embeds ~26k tiles at the encoder's default
224 px (about 10 minutes on 2 idle CPU cores, 20 measured on a busy shared one; ``--image-size 128``
is about 3x faster but is another encoder id); reruns read the cache and take about 10 seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality_metrics as qm

from rsprune_data import PruneConfig, select_with_config, selection_summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT_K = 200
BAD = "bad_images"
HARVEY_CLASSES = ("damage", "no_damage", BAD)
RULES: dict[str, dict[str, Any]] = {
    "auto": {},
    "keep0.3": {"entropy_keep": 0.3},
    "keep0.5": {"entropy_keep": 0.5},
    "keep0.7": {"entropy_keep": 0.7},
    "none": {"entropy_filter": "none"},
    "off": {"entropy_filter": "none", "max_nodata": None},
}
# label -> (which clusters, PruneConfig fields, seeded)
STRATEGIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "rsprune": ("reference", {}, False),
    "rsprune keep=0.3": ("reference", {"entropy_keep": 0.3}, False),
    "entropy": ("reference", {"strategy": "entropy"}, False),
    "stratified": ("reference", {"strategy": "stratified"}, False),
    "nearest": ("reference", {"strategy": "nearest"}, False),
    "moderate": ("reference", {"strategy": "moderate"}, False),
    "random": ("reference", {"strategy": "random"}, True),
    "pool k-means": ("pool", {"strategy": "stratified"}, False),
    "pool k-means + Stage I": ("pool", {}, False),
}
# metric key -> (title, lower is better)
METRICS: dict[str, tuple[str, bool]] = {
    "low_info_share": ("low-information share (bad_images)", True),
    "clusters_covered": ("reference clusters covered", False),
    "cluster_entropy": ("normalised entropy of reference-cluster occupancy", False),
    "fd_embed": ("Frechet distance to reference, encoder space (PCA)", True),
    "fd_hand": ("Frechet distance to reference, colour+LBP space (PCA)", True),
    "radius_embed": ("k-center radius over valid pool, encoder space", True),
    "radius_embed_good": ("k-center radius over pool without bad_images, encoder space", True),
    "radius_hand": ("k-center radius over valid pool, colour+LBP space", True),
    "radius_hand_good": ("k-center radius over pool without bad_images, colour+LBP space", True),
    "select_ms": ("selection time (ms)", True),
}
MAKEUP_METRICS: dict[str, tuple[str, bool]] = {
    "low_info_share": METRICS["low_info_share"],
    "class_entropy": ("normalised entropy of hidden-class occupancy", False),
    "ucm_classes_kept": ("UC Merced classes keeping >= 0.5 of their share (of 21)", False),
    "cluster_entropy": METRICS["cluster_entropy"],
    "fd_embed": METRICS["fd_embed"],
    "fd_hand": METRICS["fd_hand"],
    "radius_embed_good": METRICS["radius_embed_good"],
    "radius_hand_good": METRICS["radius_hand_good"],
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- preparation: the real pipeline, cached --------------------------------------------------------


class _TapEncoder:
    """Passes everything to an encoder and keeps a copy of each ``encode`` output, in call order.

    With one indexing worker the indexer encodes the valid samples of the shards in order, so the
    copies line up with the index rows; :func:`_index` checks that against the written cluster ids.
    """

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.name, self.dim = encoder.name, encoder.dim
        self.image_size, self.device = encoder.image_size, encoder.device
        self.preprocess = encoder.preprocess
        self.rows: list[NDArray[np.float32]] = []

    def encode(self, batch: Any) -> NDArray[np.float32]:
        out = self._encoder.encode(batch)
        self.rows.append(out)
        return out


def _timed(timings: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    timings[key] = round(time.perf_counter() - t0, 3)
    return out


def _pack(src: Path, out: Path, timings: dict[str, float], progress: bool) -> list[str]:
    from rsprune_data.pack import pack_folder

    marker = out / "PACKED.json"
    if marker.exists():
        shards = json.loads(marker.read_text())["shards"]
        if all(Path(s).exists() for s in shards):
            return list(shards)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _timed(
        timings,
        f"pack_{src.name}_s",
        lambda: pack_folder(
            src, out, shard_size=2000, prefix=src.name, progress=progress, overwrite=True
        ),
    )
    shards = [str(p) for p in res.shards]
    marker.write_text(
        json.dumps({"source": str(src), "shards": shards, "samples": res.num_samples})
    )
    return shards


def _index(
    name: str,
    shards: list[str],
    centroids: Any,
    encoder: Any,
    cache: Path,
    timings: dict[str, float],
    progress: bool,
) -> tuple[Any, NDArray[np.float32]]:
    """Index ``shards`` (unless current) and return the PruneIndex and per-sample embeddings."""
    from rsprune_data.centroids import assign
    from rsprune_data.index import PruneIndex, index_path_for
    from rsprune_data.indexer import index_is_current, index_shards

    index_dir = cache / "index" / name
    emb_path = cache / f"{name}_emb.npy"
    current = all(
        index_is_current(
            s, index_path_for(s, index_dir), encoder=encoder.name, centroids_digest=centroids.digest
        )
        for s in shards
    )
    if not (current and emb_path.exists()):
        log(f"indexing {name} ({len(shards)} shards) and tapping its embeddings")
        tap = _TapEncoder(encoder)
        report = _timed(
            timings,
            f"index_{name}_s",
            lambda: index_shards(
                shards,
                centroids=centroids,
                encoder=tap,
                index_dir=index_dir,
                workers=1,
                batch_size=64,
                force=True,
                progress=progress,
            ),
        )
        if not report.ok:
            raise SystemExit(f"indexing {name} failed: {report.failed}")
        index = PruneIndex.load(shards, index_dir)
        emb = np.zeros((len(index), encoder.dim), np.float32)
        tapped = np.concatenate(tap.rows) if tap.rows else np.zeros((0, encoder.dim), np.float32)
        if tapped.shape[0] != int(index.valid.sum()):
            raise SystemExit(
                f"tapped {tapped.shape[0]} embeddings for {int(index.valid.sum())} valid samples"
            )
        emb[index.valid] = tapped
        z, _ = assign(tapped, centroids.centroids, device=encoder.device)
        agree = float((z == index.cluster_ids[index.valid]).mean())
        if agree < 0.999:
            raise SystemExit(
                f"tapped embeddings do not line up with the {name} index ({agree:.4f} agree)"
            )
        np.save(emb_path, emb)
    index = PruneIndex.load(shards, index_dir)
    return index, np.load(emb_path, mmap_mode="r")


def _shard_features(shard: str) -> NDArray[np.float32]:
    from rsprune_data.images import decode_rgb, pick_image_member
    from rsprune_data.tario import iter_tar_samples

    rows = []
    for _, sample in iter_tar_samples(shard):
        picked = pick_image_member(sample)
        try:
            rows.append(
                qm.colour_texture_features(decode_rgb(picked[1], picked[0]))
                if picked
                else np.zeros(68, np.float32)
            )
        except ValueError:  # CorruptImageError: invalid in the index too, never selected
            rows.append(np.zeros(68, np.float32))
    return np.stack(rows)


def _features(
    name: str, shards: list[str], cache: Path, workers: int, timings: dict[str, float]
) -> NDArray[np.float32]:
    path = cache / "features" / f"{name}_colour_lbp.npy"
    if not path.exists():
        log(f"colour + LBP features of {name} ({len(shards)} shards, {workers} processes)")
        path.parent.mkdir(parents=True, exist_ok=True)

        def compute() -> NDArray[np.float32]:
            if workers <= 1:
                return np.concatenate([_shard_features(s) for s in shards])
            from multiprocessing import get_context

            with get_context("spawn").Pool(workers) as pool:
                return np.concatenate(pool.map(_shard_features, shards))

        np.save(path, _timed(timings, f"features_{name}_s", compute))
    return np.load(path)


@dataclass
class Universe:
    """Harvey followed by UC Merced: per-sample arrays every pool is cut from."""

    names: list[str]  # "harvey", "ucmerced"
    starts: dict[str, tuple[int, int]]
    entropy: NDArray[Any]
    nodata: NDArray[Any]
    cluster: NDArray[np.int16]  # reference cluster
    similarity: NDArray[Any]
    valid: NDArray[np.bool_]
    classes: list[str]  # hidden class names: 21 UC Merced, then damage, no_damage, bad_images
    label: NDArray[np.int64]
    emb_pca: NDArray[np.float32]
    hand_pca: NDArray[np.float32]
    pool_cluster: NDArray[np.int16]  # Harvey only: cluster of the pool's own k-means (-1 elsewhere)
    pool_similarity: NDArray[np.float32]
    harvey_index: Any
    k: int = DEFAULT_K
    timings: dict[str, float] = field(default_factory=dict)
    encoder: str = ""

    @property
    def bad(self) -> NDArray[np.bool_]:
        return self.label == self.classes.index(BAD)

    def positions(self, name: str) -> NDArray[np.int64]:
        lo, hi = self.starts[name]
        return np.arange(lo, hi, dtype=np.int64)

    @property
    def num_ucm_classes(self) -> int:
        return len(self.classes) - len(HARVEY_CLASSES)


def prepare(args: argparse.Namespace) -> Universe:
    from rsprune_data.centroids import Centroids, assign, build_centroids, spherical_kmeans
    from rsprune_data.encoders import load_encoder

    progress, K = not args.quiet, args.k
    encoder = load_encoder(args.encoder, image_size=args.image_size)
    cache_root = Path(args.cache)
    cache = cache_root / encoder.name.replace("/", "_").replace(":", "_")
    cache.mkdir(parents=True, exist_ok=True)
    timings_path = cache / "timings.json"
    timings: dict[str, float] = (
        json.loads(timings_path.read_text()) if timings_path.exists() else {}
    )
    log(f"encoder {encoder.name} ({encoder.image_size} px, {encoder.device}); cache {cache}")

    pool_dir, ref_dir = Path(args.pool).resolve(), Path(args.reference).resolve()
    shards = {
        "harvey": _pack(pool_dir, cache_root / "shards" / "harvey", timings, progress),
        "ucmerced": _pack(ref_dir, cache_root / "shards" / "ucmerced", timings, progress),
    }
    cpath = cache / f"centroids_k{K}.safetensors"
    if cpath.exists():
        centroids = Centroids.load(cpath)
    else:
        log(f"building K={K} reference centroids on {ref_dir}")
        centroids = _timed(
            timings,
            "build_centroids_s",
            lambda: build_centroids([ref_dir], encoder, k=K, seed=0, progress=progress),
        )
        centroids.save(cpath)
    indexes, embs = {}, {}
    for name, sh in shards.items():
        indexes[name], embs[name] = _index(name, sh, centroids, encoder, cache, timings, progress)
    hand = {
        name: _features(name, sh, cache_root, args.workers, timings) for name, sh in shards.items()
    }

    hx, ux = indexes["harvey"], indexes["ucmerced"]
    n_h, n_u = len(hx), len(ux)
    ucm_classes = sorted({k.split("/", 1)[0] for k in ux.keys})
    classes = [*ucm_classes, *HARVEY_CLASSES]
    lookup = {c: i for i, c in enumerate(classes)}
    label = np.array([lookup[k.split("/", 1)[0]] for k in [*hx.keys, *ux.keys]], dtype=np.int64)
    valid = np.concatenate([hx.valid, ux.valid])

    # Both spaces: PCA fitted on the valid tiles of pool + reference
    epath = cache / f"pca{args.pca_dims}_embed.npy"
    if not epath.exists():
        emb_all = np.concatenate([embs["harvey"], embs["ucmerced"]])
        basis = qm.pca_basis(emb_all[valid], args.pca_dims)
        np.save(epath, qm.pca_project(emb_all, basis))
    hpath = cache_root / "features" / f"pca{args.pca_dims}_colour_lbp.npy"
    if not hpath.exists():
        hand_all = np.concatenate([hand["harvey"], hand["ucmerced"]])
        basis = qm.pca_basis(hand_all[valid], args.pca_dims, standardize=True)
        np.save(hpath, qm.pca_project(hand_all, basis))

    # Clustering cost: the reference k-means against the paper's ablation (k-means on the pool).
    # Both run on embeddings that exist anyway (the pool must be embedded to be assigned).
    kpath = cache / f"pool_kmeans_k{K}.npy"
    if not kpath.exists() or "pool_kmeans_s" not in timings:
        log(
            f"k-means K={K} on the reference ({n_u}) and on the pool itself ({int(hx.valid.sum())})"
        )
        ref_emb = np.asarray(embs["ucmerced"])[ux.valid]
        _timed(timings, "reference_kmeans_s", lambda: spherical_kmeans(ref_emb, K, seed=0))
        pool_emb = np.asarray(embs["harvey"])[hx.valid]
        mu = _timed(timings, "pool_kmeans_s", lambda: spherical_kmeans(pool_emb, K, seed=0))
        _timed(timings, "assign_pool_s", lambda: assign(pool_emb, centroids.centroids))
        np.save(kpath, mu)
    mu = np.load(kpath)
    pz = np.full(n_h + n_u, -1, np.int16)
    ps = np.zeros(n_h + n_u, np.float32)
    hz, hs = assign(np.asarray(embs["harvey"])[hx.valid], mu)
    pz[:n_h][hx.valid], ps[:n_h][hx.valid] = hz, hs
    timings_path.write_text(json.dumps(timings, indent=2))

    return Universe(
        names=["harvey", "ucmerced"],
        starts={"harvey": (0, n_h), "ucmerced": (n_h, n_h + n_u)},
        entropy=np.concatenate([hx.entropy, ux.entropy]),
        nodata=np.concatenate([hx.nodata, ux.nodata]),
        cluster=np.concatenate([hx.cluster_ids, ux.cluster_ids]),
        similarity=np.concatenate([hx.similarity, ux.similarity]),
        valid=valid,
        classes=classes,
        label=label,
        emb_pca=np.load(epath),
        hand_pca=np.load(hpath),
        pool_cluster=pz,
        pool_similarity=ps,
        harvey_index=hx,
        k=K,
        timings=timings,
        encoder=encoder.name,
    )


# --- pools and metrics -----------------------------------------------------------------------------


def make_pools(u: Universe, skip_mixes: bool) -> dict[str, NDArray[np.int64]]:
    """Universe positions (sorted) of every pool; subsamples use a fixed seed."""
    rng = np.random.default_rng(0)
    harvey, ucm = u.positions("harvey"), u.positions("ucmerced")
    pools = {"harvey": harvey}
    if skip_mixes:
        return pools
    pools["ucmerced"] = ucm
    for name, times in (("mix50", 1), ("mix20", 4)):  # UC Merced = 50% and 20% of the pool
        n = min(times * ucm.size, harvey.size)
        pools[name] = np.sort(np.concatenate([ucm, rng.choice(harvey, n, replace=False)]))
    bad = harvey[u.bad[harvey]]
    good = harvey[~u.bad[harvey]]
    n_good = min(round(bad.size * 0.6 / 0.4), good.size)
    pools["nodata40"] = np.sort(np.concatenate([bad, rng.choice(good, n_good, replace=False)]))
    return pools


def pool_index(u: Universe, pos: NDArray[np.int64], clusters: str = "reference") -> Any:
    from rsprune_data.index import PruneIndex

    z, s = (
        (u.cluster, u.similarity)
        if clusters == "reference"
        else (u.pool_cluster, u.pool_similarity)
    )
    return PruneIndex.from_arrays(
        u.entropy[pos], z[pos], s[pos], num_clusters=u.k, valid=u.valid[pos], nodata=u.nodata[pos]
    )


class Evaluator:
    """Metrics of a selection (universe positions), cached by pool and selection digest."""

    def __init__(self, u: Universe, cache_file: Path) -> None:
        self.u = u
        self.ref = u.positions("ucmerced")[u.valid[u.positions("ucmerced")]]
        self.cache_file = cache_file
        self.cache: dict[str, dict[str, Any]] = (
            json.loads(cache_file.read_text()) if cache_file.exists() else {}
        )

    def save(self) -> None:
        self.cache_file.write_text(json.dumps(self.cache))

    def __call__(self, pool: NDArray[np.int64], sel: NDArray[np.int64]) -> dict[str, Any]:
        h = hashlib.sha1(pool.tobytes() + b"|" + sel.tobytes()).hexdigest()
        if h not in self.cache:
            self.cache[h] = self._compute(pool, sel)
        return dict(self.cache[h])

    def _compute(self, pool: NDArray[np.int64], sel: NDArray[np.int64]) -> dict[str, Any]:
        u, K = self.u, self.u.k
        pv = pool[u.valid[pool]]
        bad_pv = u.bad[pv]
        out: dict[str, Any] = {"selected": int(sel.size)}
        out["low_info_share"] = float(u.bad[sel].mean()) if bad_pv.any() and sel.size else None
        out["clusters_covered"] = qm.cluster_coverage(u.cluster[sel], K)
        out["clusters_in_pool"] = qm.cluster_coverage(u.cluster[pv], K)
        out["cluster_entropy"] = qm.occupancy_entropy(u.cluster[sel], K)
        # hidden classes present in the pool (bad_images is junk, not a class to balance)
        present = np.unique(u.label[pv][~bad_pv])
        remap = np.full(len(u.classes), -1, np.int64)
        remap[present] = np.arange(present.size)
        out["class_entropy"] = (
            qm.occupancy_entropy(remap[u.label[sel]], present.size) if present.size >= 2 else None
        )
        ratio = qm.share_ratio(u.label[sel], u.label[pv], len(u.classes))[: u.num_ucm_classes]
        if np.isfinite(ratio).any():
            fin = np.where(np.isfinite(ratio), ratio, np.inf)
            out["ucm_classes_kept"] = int((ratio >= 0.5).sum())
            out["ucm_classes_lost"] = int((ratio < 0.1).sum())
            worst = np.argsort(fin)[:3]
            out["ucm_worst"] = {u.classes[i]: round(float(ratio[i]), 3) for i in worst}
        for space, coords in (("embed", u.emb_pca), ("hand", u.hand_pca)):
            out[f"fd_{space}"] = (
                qm.frechet_distance(coords[sel], coords[self.ref]) if sel.size > 1 else None
            )
            d = (
                qm.nearest_distances(coords[pv], coords[sel])
                if sel.size
                else np.full(pv.size, np.nan)
            )
            out[f"radius_{space}"] = float(d.max())
            out[f"radius_{space}_good"] = float(d[~bad_pv].max()) if (~bad_pv).any() else None
            out[f"mean_nn_{space}_good"] = float(d[~bad_pv].mean()) if (~bad_pv).any() else None
        return out


def timed_select(
    index: Any, config: PruneConfig, repeat: int = 3
) -> tuple[NDArray[np.int64], float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sel = select_with_config(index, config)
        times.append(time.perf_counter() - t0)
    return sel, min(times) * 1e3


def _stage1_info(index: Any, config: PruneConfig, sel: NDArray[np.int64]) -> dict[str, Any]:
    s = selection_summary(index, config, sel)
    return {
        k: s[k]
        for k in (
            "stage1_rule",
            "entropy_threshold",
            "entropy_keep",
            "nodata_dropped",
            "stage1_dropped",
            "candidates",
            "budget",
            "shortfall",
        )
    }


def mean_std(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": {}, "std": {}, "seeds": list(runs)}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            vals = np.array([r[key] for r in runs], dtype=np.float64)
            out["mean"][key], out["std"][key] = float(vals.mean()), float(vals.std())
    return out


def run_strategies(
    u: Universe, ev: Evaluator, ratios: Sequence[float], seeds: int
) -> dict[str, Any]:
    pos = u.positions("harvey")
    indexes = {"reference": u.harvey_index, "pool": pool_index(u, pos, "pool")}
    results: dict[str, Any] = {}
    for label, (clusters, fields_, seeded) in STRATEGIES.items():
        results[label] = {}
        for r in ratios:
            runs = []
            for seed in range(seeds if seeded else 1):
                cfg = PruneConfig(prune_ratio=r, seed=seed, **fields_)
                sel, ms = timed_select(indexes[clusters], cfg, 1 if seeded else 3)
                m = ev(pos, pos[sel])
                m["select_ms"] = ms
                if not seeded:
                    m["stage1"] = _stage1_info(indexes[clusters], cfg, sel)
                runs.append(m)
            results[label][str(r)] = mean_std(runs) if seeded else runs[0]
        log(f"  {label}: done")
    return results


def run_dedup(
    u: Universe, ev: Evaluator, ratios: Sequence[float], taus: Sequence[float], emb_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Near-duplicate groups of the Harvey pool at each ``tau`` and ``rsprune`` with
    ``dedup_threshold=tau`` at every ratio (issue 13), from the tapped embeddings in their canonical
    float16 form (what a float16 sidecar stores)."""
    from rsprune_data.dedup import duplicate_groups, near_duplicates
    from rsprune_data.embeddings import canonical

    pos = u.positions("harvey")
    emb16 = canonical(np.load(emb_path))
    results: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for tau in taus:
        t0 = time.perf_counter()
        dup = near_duplicates(emb16, u.cluster[pos], u.similarity[pos], tau, valid=u.valid[pos])
        seconds = time.perf_counter() - t0
        groups = duplicate_groups(dup)
        dups = np.flatnonzero(dup >= 0)
        counts[str(tau)] = {
            "groups": len(groups),
            "duplicates": int(dups.size),
            "largest_group": 1 + max((len(g) for _, g in groups), default=0),
            "duplicates_in_bad_images": int(u.bad[pos][dups].sum()),
            "seconds": round(seconds, 3),
            "example_groups": [
                [u.harvey_index.keys[h], [u.harvey_index.keys[j] for j in g[:5]]]
                for h, g in groups[:5]
            ],
        }
        index = pool_index(u, pos).attach_embeddings(emb16)
        label = f"rsprune + dedup {tau:g}"
        results[label] = {}
        for r in ratios:
            cfg = PruneConfig(prune_ratio=r, dedup_threshold=tau)
            sel, ms = timed_select(index, cfg, 3)
            m = ev(pos, pos[sel])
            m["select_ms"] = ms
            m["stage1"] = _stage1_info(index, cfg, sel)
            results[label][str(r)] = m
        log(
            f"  dedup tau={tau:g}: {counts[str(tau)]['groups']} groups, "
            f"{counts[str(tau)]['duplicates']} duplicates ({seconds:.2f} s)"
        )
    return results, counts


def run_makeups(
    u: Universe,
    ev: Evaluator,
    pools: dict[str, NDArray[np.int64]],
    ratios: Sequence[float],
    rules: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pos in pools.items():
        index = u.harvey_index if name == "harvey" else pool_index(u, pos)
        labels = u.label[pos]
        desc = {u.classes[c]: int((labels == c).sum()) for c in np.unique(labels)}
        info = {
            "samples": int(pos.size),
            "bad_images": int(u.bad[pos].sum()),
            "harvey": int((pos < u.starts["harvey"][1]).sum()),
            "ucmerced": int((pos >= u.starts["ucmerced"][0]).sum()),
            "hidden_classes": desc,
        }
        res: dict[str, Any] = {}
        for rule, fields_ in rules.items():
            res[rule] = {}
            for r in ratios:
                cfg = PruneConfig(prune_ratio=r, **fields_)
                sel, ms = timed_select(index, cfg, 1)
                m = ev(pos, pos[sel])
                m["select_ms"] = ms
                m["stage1"] = _stage1_info(index, cfg, sel)
                res[rule][str(r)] = m
        out[name] = {"pool": info, "rules": res}
        log(f"  make-up {name}: done")
    return out


# --- reporting ---------------------------------------------------------------------------------------


def _value(entry: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    if "mean" in entry:
        return entry["mean"].get(key), entry["std"].get(key)
    v = entry.get(key)
    return (None if v is None else float(v)), None


def _sig(v: float) -> str:
    """Three significant digits, without exponent or lost trailing zeros (0.273, 4.20, 81.7, 119)."""
    digits = max(0, 2 - int(np.floor(np.log10(abs(v))))) if v else 2
    return f"{v:.{digits}f}"


def _fmt(v: float | None, s: float | None, key: str) -> str:
    if v is None:
        return "n/a"
    if key == "low_info_share":
        txt, sd = f"{100 * v:.2f}%", (f"{100 * s:.2f}" if s is not None else None)
    elif key in ("clusters_covered", "ucm_classes_kept", "ucm_classes_lost", "selected"):
        txt, sd = f"{v:.0f}", (f"{s:.1f}" if s is not None else None)
    elif key == "select_ms":
        txt, sd = f"{v:.1f}", None
    elif key.startswith(("fd_", "radius_")):
        txt, sd = _sig(v), (_sig(s) if s is not None else None)
    else:
        txt, sd = f"{abs(v) if abs(v) < 5e-4 else v:.3f}", (f"{s:.3f}" if s is not None else None)
    return f"{txt} ± {sd}" if sd is not None else txt


def dedup_lines(counts: dict[str, Any]) -> str:
    lines = [
        "Near-duplicate groups in the pool (within a reference cluster, greedy by centrality):"
    ]
    for tau, c in counts.items():
        lines.append(
            f"- tau = {tau}: {c['groups']} groups, {c['duplicates']} duplicates removed "
            f"(largest group {c['largest_group']} tiles; {c['duplicates_in_bad_images']} of "
            f"the duplicates are bad_images; {c['seconds']} s)"
        )
    return "\n".join(lines)


def main_table(results: dict[str, Any], ratio: float) -> str:
    cols = [
        "low_info_share",
        "clusters_covered",
        "cluster_entropy",
        "fd_embed",
        "fd_hand",
        "radius_embed",
        "radius_embed_good",
        "radius_hand",
        "radius_hand_good",
        "select_ms",
    ]
    in_pool = _value(next(iter(results.values()))[str(ratio)], "clusters_in_pool")[0]
    head = [
        "strategy",
        "low-info share",
        f"clusters covered (of {in_pool:.0f} in pool)",
        "cluster balance H",
        "FD enc",
        "FD colour+LBP",
        "radius enc (all)",
        "radius enc (no bad)",
        "radius c+LBP (all)",
        "radius c+LBP (no bad)",
        "select ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_ratio in results.items():
        e = by_ratio[str(ratio)]
        cells = [_fmt(*_value(e, c), c) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def makeup_table(makeups: dict[str, Any], ratio: float) -> str:
    head = [
        "pool",
        "Stage I",
        "cut",
        "candidates",
        "low-info share",
        "hidden-class H",
        "UCM classes kept (lost)",
        "cluster balance H",
        "FD enc",
        "FD colour+LBP",
        "radius enc (no bad)",
        "radius c+LBP (no bad)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in makeups.items():
        for rule, by_ratio in m["rules"].items():
            e = by_ratio[str(ratio)]
            st = e["stage1"]
            cut = (
                f"H >= {st['entropy_threshold']:.2f}"
                if st["entropy_threshold"] is not None
                else f"top {st['entropy_keep']:.0%}"
                if st["entropy_keep"] is not None
                else "-"
            )
            kept = (
                f"{e['ucm_classes_kept']} ({e['ucm_classes_lost']})"
                if "ucm_classes_kept" in e
                else "n/a"
            )
            cells = [
                name,
                rule,
                cut,
                f"{st['candidates']}",
                _fmt(*_value(e, "low_info_share"), "low_info_share"),
                _fmt(*_value(e, "class_entropy"), "class_entropy"),
                kept,
                _fmt(*_value(e, "cluster_entropy"), "cluster_entropy"),
                _fmt(*_value(e, "fd_embed"), "fd_embed"),
                _fmt(*_value(e, "fd_hand"), "fd_hand"),
                _fmt(*_value(e, "radius_embed_good"), "radius_embed_good"),
                _fmt(*_value(e, "radius_hand_good"), "radius_hand_good"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shortfalls(results: dict[str, Any]) -> str:
    """A note naming the selections that had fewer candidates than the budget."""
    found = [
        f"`{label}` at {r} ({e['stage1']['candidates']:,} candidates for a budget of "
        f"{e['stage1']['budget']:,})"
        for label, by_ratio in results.items()
        for r, e in by_ratio.items()
        if "stage1" in e and e["stage1"]["shortfall"] > 0
    ]
    return (
        "Shortfalls (all candidates kept, fewer than the budget): " + "; ".join(found) + "."
        if found
        else "No selection fell short of its budget."
    )


def verdict_table(makeups: dict[str, Any], ratios: Sequence[float], rel_tol: float = 0.01) -> str:
    """``auto`` against every other rule: metrics won / tied / lost, summed over the ratios.

    Compared metrics are those of :data:`MAKEUP_METRICS` that the pool has; values within ``rel_tol``
    (relative) or 0.001 (absolute) of each other are ties.
    """
    rules = list(next(iter(makeups.values()))["rules"])
    others = [r for r in rules if r != "auto"]
    head = ["pool", *[f"auto vs {r}" for r in others], "auto lost to a fixed fraction on (times)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in makeups.items():
        cells: list[str] = []
        lost_on: Counter[str] = Counter()
        for other in others:
            w = t = lo = 0
            for r in ratios:
                a, b = m["rules"]["auto"][str(r)], m["rules"][other][str(r)]
                for key, (_, lower) in MAKEUP_METRICS.items():
                    va, vb = a.get(key), b.get(key)
                    if va is None or vb is None:
                        continue
                    if abs(va - vb) <= max(rel_tol * max(abs(va), abs(vb)), 1e-3):
                        t += 1
                    elif (va < vb) == lower:
                        w += 1
                    else:
                        lo += 1
                        if other.startswith("keep"):
                            lost_on[key] += 1
            cells.append(f"{w} / {t} / {lo}")
        worst = ", ".join(f"{key} ({n})" for key, n in lost_on.most_common()) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines)


def plot_strategies(results: dict[str, Any], ratios: Sequence[float], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, (title, lower) in METRICS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (label, by_ratio) in enumerate(results.items()):
            vals = [_value(by_ratio[str(r)], key) for r in ratios]
            if all(v is None for v, _ in vals):
                continue
            y = np.array([np.nan if v is None else v for v, _ in vals])
            style = "-" if i < 7 else "--"
            (line,) = ax.plot(
                ratios,
                y,
                style,
                marker="o",
                ms=4,
                label=label,
                lw=2.4 if label == "rsprune" else 1.4,
            )
            if vals[0][1] is not None:
                sd = np.array([s or 0.0 for _, s in vals])
                ax.fill_between(ratios, y - sd, y + sd, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("prune ratio")
        ax.set_title(f"{title} ({'lower' if lower else 'higher'} is better)", fontsize=10)
        if key == "low_info_share":
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        if key == "select_ms":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"quality_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_makeups(makeups: dict[str, Any], ratios: Sequence[float], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rules = list(next(iter(makeups.values()))["rules"])
    markers = {rule: "osD^vx*P+h"[i % 10] for i, rule in enumerate(rules)}
    for key, (title, lower) in MAKEUP_METRICS.items():
        names = [
            n
            for n in makeups
            if any(
                e[str(r)].get(key) is not None for e in makeups[n]["rules"].values() for r in ratios
            )
        ]
        if not names:
            continue
        fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.8), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for rule, by_ratio in makeups[name]["rules"].items():
                y = [by_ratio[str(r)].get(key) for r in ratios]
                ax.plot(
                    ratios,
                    [np.nan if v is None else v for v in y],
                    marker=markers[rule],
                    ms=6 if rule == "auto" else 4,
                    mfc="none",
                    label=rule,
                    lw=2.6 if rule == "auto" else 1.2,
                    ls="-" if rule == "auto" else "--",
                )
            ax.set_title(name, fontsize=9)
            if key == "low_info_share":
                ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            ax.set_xlabel("prune ratio", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=len(labels))
        fig.suptitle(
            f"Stage I rules under rsprune: {title} ({'lower' if lower else 'higher'} is better)",
            fontsize=10,
            x=0.02,
            ha="left",
        )
        fig.tight_layout(rect=(0, 0.07, 1, 0.93))
        path = out / f"quality_makeup_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cache",
        default="/tmp/rsprune_quality",
        help="shards, indexes, embeddings (outside the repo)",
    )
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--reference", default=str(REPO.parent / "shared" / "data" / "ucmerced"))
    ap.add_argument("--pool", default=str(REPO.parent / "shared" / "data" / "harvey"))
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="encoder input side; default: the encoder's own (224 for efficientnet-lite0)",
    )
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.9])
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the random baseline")
    ap.add_argument(
        "--k", type=int, default=DEFAULT_K, help="reference clusters (the paper's K = 200)"
    )
    ap.add_argument("--pca-dims", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="processes for the colour+LBP features")
    ap.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=[],
        help="extra fixed entropy_threshold rules (bits) for part 2, e.g. 5.0 5.5",
    )
    ap.add_argument("--skip-mixes", action="store_true", help="only the Harvey pool in part 2")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument(
        "--cloud",
        action="store_true",
        help="only part 3: the cloud/haze rule's trade-off (entropy-only indexes, "
        "no encoder; a minute or two)",
    )
    ap.add_argument(
        "--dedup",
        type=float,
        nargs="*",
        default=[],
        help="near-duplicate thresholds tau (issue 13), e.g. 0.95 0.98: group counts and "
        "rsprune with dedup_threshold=tau as extra strategies",
    )
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.cloud:
        import _cloud_tradeoff

        log("part 3: the cloud/haze rule (max_cloud) on Harvey and UC Merced")
        print(
            _cloud_tradeoff.run(
                Path(args.pool), Path(args.reference), Path(args.cache), args.out, not args.quiet
            )
        )
        log(f"wrote {args.out / 'quality_cloud.json'} in {time.perf_counter() - t_start:.1f} s")
        return
    table_ratio = 0.85 if 0.85 in args.ratios else args.ratios[-1]

    u = prepare(args)
    log(f"prepared in {time.perf_counter() - t_start:.1f} s")
    ev = Evaluator(
        u,
        Path(args.cache)
        / u.encoder.replace("/", "_").replace(":", "_")
        / f"metrics_k{u.k}_pca{args.pca_dims}.json",
    )
    log("part 1: strategies on the Harvey pool")
    results = run_strategies(u, ev, args.ratios, args.seeds)
    dedup_counts: dict[str, Any] = {}
    if args.dedup:
        cache_dir = Path(args.cache) / u.encoder.replace("/", "_").replace(":", "_")
        extra, dedup_counts = run_dedup(
            u, ev, args.ratios, args.dedup, cache_dir / "harvey_emb.npy"
        )
        results.update(extra)
    log("part 2: Stage I rules on pools of different make-up")
    rules = {**RULES, **{f"t{t:g}": {"entropy_threshold": t} for t in args.thresholds}}
    makeups = run_makeups(u, ev, make_pools(u, args.skip_mixes), args.ratios, rules)
    ev.save()

    args.out.mkdir(parents=True, exist_ok=True)
    hx = u.harvey_index
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    K = u.k
    meta = {
        "command": command.strip(),
        "encoder": u.encoder,
        "k": K,
        "pca_dims": args.pca_dims,
        "ratios": args.ratios,
        "random_seeds": args.seeds,
        "reference": args.reference,
        "pool": args.pool,
        "pool_samples": len(hx),
        "pool_bad_images": int(u.bad[u.positions("harvey")].sum()),
        "timings_s": u.timings,
        "cpu_count": os.cpu_count(),
        "near_duplicates": dedup_counts,
    }
    (args.out / "quality.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    for name, m in makeups.items():
        (args.out / f"quality_makeup_{name}.json").write_text(json.dumps({**meta, **m}, indent=2))
    plots = plot_strategies(results, args.ratios, args.out) + plot_makeups(
        makeups, args.ratios, args.out
    )

    t = u.timings
    clustering = (
        f"Clustering (K={K}, spherical k-means, 25 iterations, same CPU): reference "
        f"{t.get('reference_kmeans_s', float('nan')):.1f} s on {int(u.valid[u.positions('ucmerced')].sum())} "
        f"UC Merced embeddings (whole `build_centroids`, embedding included: "
        f"{t.get('build_centroids_s', float('nan')):.1f} s); pool itself "
        f"{t.get('pool_kmeans_s', float('nan')):.1f} s on {int(hx.valid.sum())} Harvey embeddings; "
        f"assigning the pool to the reference centroids {t.get('assign_pool_s', float('nan')):.2f} s."
    )
    st = results["rsprune"][str(table_ratio)]["stage1"]
    md = "\n\n".join(
        [
            f"### Quality at prune ratio {table_ratio} (pool = Harvey, {len(hx):,} tiles; reference = UC Merced; "
            f"encoder {u.encoder}; K = {K})",
            f"Command: `{meta['command']}`",
            main_table(results, table_ratio),
            f"`rsprune` = default config (data-driven Stage I: H >= {st['entropy_threshold']:.2f} bits, "
            f"{st['nodata_dropped']} tiles over max_nodata, {st['stage1_dropped']} below the cut). Random: mean ± std "
            f"over {args.seeds} seeds. FD and radii in {args.pca_dims} principal components fitted on pool + "
            "reference; 'no bad' = over the valid pool without `bad_images`. " + clustering,
            shortfalls(results),
            *([dedup_lines(dedup_counts)] if dedup_counts else []),
            f"### Stage I rules under `rsprune` on pools of different make-up, ratio {table_ratio}",
            makeup_table(makeups, table_ratio),
            "Stage I `auto` against the other rules over all ratios "
            f"({', '.join(map(str, args.ratios))}) and the make-up metrics (won / tied / lost; ties within 1%):",
            verdict_table(makeups, args.ratios),
        ]
    )
    (args.out / "quality_table_085.md").write_text(md + "\n")
    print("\n" + md + "\n")
    log(
        f"wrote {args.out / 'quality.json'}, {len(makeups)} make-up JSON files, {len(plots)} plots, "
        f"{args.out / 'quality_table_085.md'} in {time.perf_counter() - t_start:.1f} s"
    )


if __name__ == "__main__":
    main()
