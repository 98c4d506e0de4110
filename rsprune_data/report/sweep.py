"""The ratio sweep and the near-duplicate sheet of the report, from stored embeddings.

For each pruning ratio in :data:`SWEEP_RATIOS` (and the chosen one) the selection of ``config`` at
that ratio is measured, so a user sees where quality falls off before training:

- coverage: reference clusters holding at least one selected sample / clusters in the pool;
- balance: normalised entropy of the selection's occupancy of those clusters (1 = even);
- Frechet distance (as FID) between Gaussians fitted to the selection's and the target's embeddings,
  both in ``pca_dims`` principal components fitted on the valid pool; the target is the reference
  embeddings when given, else the valid pool itself (then it measures representativeness);
- k-center radius: the largest distance from a valid pool sample (a seeded sample of at most
  ``max_points``) to its nearest selected sample, in the same space (exact, faiss ``IndexFlatL2``;
  cost ``max_points * B * pca_dims``).

Numbers only (numpy + faiss); the figure and the page live beside it. Embeddings come from the
sidecars (:func:`rsprune_data.dedup_cache.load_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..config import PruneConfig

if TYPE_CHECKING:
    from ..index import PruneIndex
    from .sheets import Tile

SWEEP_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
METRICS = {
    "coverage": "reference clusters covered (share of those in the pool)",
    "balance": "balance (normalised entropy of cluster occupancy)",
    "frechet": "Frechet distance to the target (PCA space)",
    "radius": "k-center radius over the pool (PCA space)",
}


@dataclass
class Sweep:
    ratios: list[float]
    chosen: float
    target: str  # "reference embeddings" or "pool"
    values: dict[str, list[float]] = field(default_factory=dict)
    selected: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "chosen": self.chosen,
            "target": self.target,
            "selected": self.selected,
            **self.values,
        }


def frechet_distance(a: NDArray[Any], b: NDArray[Any]) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)`` of the rows of a and b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = np.linalg.eigvalsh(root @ cb @ root)
    cross = float(np.sqrt(np.clip(mid, 0, None)).sum())
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


def kcenter_radius(points: NDArray[Any], centers: NDArray[Any]) -> float:
    """Largest distance from a point to its nearest center (exact)."""
    import faiss

    if centers.shape[0] == 0:
        return float("nan")
    flat = faiss.IndexFlatL2(centers.shape[1])
    flat.add(np.ascontiguousarray(centers, np.float32))
    dist, _ = flat.search(np.ascontiguousarray(points, np.float32), 1)
    return float(np.sqrt(np.clip(dist, 0, None)).max(initial=0.0))


def ratio_sweep(
    index: PruneIndex,
    config: PruneConfig,
    embeddings: NDArray[Any],
    *,
    reference: NDArray[Any] | None = None,
    ratios: tuple[float, ...] = SWEEP_RATIOS,
    pca_dims: int = 32,
    max_points: int = 20_000,
    seed: int = 0,
) -> Sweep:
    """The metrics of ``config`` at every ratio (see the module docstring)."""
    from ..plan import select_with_config

    valid = np.asarray(index.valid, bool)
    emb = np.asarray(embeddings, np.float32)
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(valid)
    fit = pool if pool.size <= max_points else np.sort(rng.choice(pool, max_points, replace=False))
    mean = emb[fit].mean(axis=0)
    _, _, vt = np.linalg.svd(emb[fit] - mean, full_matrices=False)
    axes = vt[: min(pca_dims, vt.shape[0])].T

    def proj(x: NDArray[Any]) -> NDArray[np.float32]:
        return np.asarray((np.asarray(x, np.float32) - mean) @ axes, np.float32)

    z_all = proj(emb)
    target = proj(reference) if reference is not None else z_all[fit]
    points = z_all[fit]
    k = int(index.num_clusters)
    z = np.asarray(index.cluster_ids)
    in_pool = np.bincount(z[valid], minlength=k) if k else np.zeros(0, np.int64)
    live = int(np.count_nonzero(in_pool))
    all_ratios = sorted({*ratios, config.prune_ratio})
    out = Sweep(
        all_ratios,
        config.prune_ratio,
        "reference embeddings" if reference is not None else "pool",
        {m: [] for m in METRICS},
    )
    for r in all_ratios:
        sel = select_with_config(index, config.replace(prune_ratio=r))
        occ = np.bincount(z[sel], minlength=k) if k else np.zeros(0, np.int64)
        covered = int(np.count_nonzero(occ))
        p = occ[occ > 0] / max(1, occ.sum())
        balance = (
            float(-(p * np.log(p)).sum() / np.log(live)) if live > 1 and p.size else float("nan")
        )
        out.values["coverage"].append(covered / live if live else float("nan"))
        out.values["balance"].append(balance)
        out.values["frechet"].append(frechet_distance(z_all[sel], target))
        out.values["radius"].append(kcenter_radius(points, z_all[sel]))
        out.selected.append(int(sel.size))
    return out


def sweep_figure(sweep: Sweep, path: Path) -> Path:
    """Four small panels, one metric each over the ratio, the chosen ratio marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 5.2), dpi=110, layout="constrained")
    axs = fig.subplots(2, 2)
    for ax, (key, title) in zip(axs.ravel(), METRICS.items(), strict=True):
        ax.plot(sweep.ratios, sweep.values[key], marker="o", color="#1971c2")
        ax.axvline(sweep.chosen, color="#c92a2a", linestyle="--", linewidth=1)
        ax.set_title(title if key != "frechet" else f"{title}, target: {sweep.target}", fontsize=9)
        ax.set_xlabel("prune ratio", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(color="#e9ecef", linewidth=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="white")
    return path


def duplicate_tiles(
    index: PruneIndex,
    dup_of: NDArray[np.int64],
    selected: NDArray[np.int64],
    *,
    groups: int = 6,
    per_group: int = 7,
) -> list[Tile]:
    """Tiles of the largest near-duplicate groups: the kept sample first, then its duplicates."""
    from ..dedup import duplicate_groups
    from .sheets import Tile
    from .stats import NOT_SELECTED, SELECTED

    chosen = np.zeros(len(index), bool)
    chosen[selected] = True
    tiles: list[Tile] = []
    for g, (head, dups) in enumerate(duplicate_groups(dup_of)[:groups]):
        for j, pos in enumerate([head, *dups[:per_group]]):
            caption = f"group {g + 1}: kept" if j == 0 else f"dup of {head}"
            tiles.append(Tile(int(pos), caption, SELECTED if chosen[pos] else NOT_SELECTED))
    return tiles


__all__ = [
    "SWEEP_RATIOS",
    "Sweep",
    "duplicate_tiles",
    "frechet_distance",
    "kcenter_radius",
    "ratio_sweep",
    "sweep_figure",
]
