"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend).

Each function takes :class:`~rsprune_data.report.stats.ReportStats` plus the index arrays it needs
and writes one PNG. ``matplotlib`` is imported inside the functions, so importing the package
stays cheap; :class:`matplotlib.figure.Figure` renders through Agg without touching pyplot's
global state, which keeps the report safe to call inside a training script.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .stats import NODATA, NOT_SELECTED, SELECTED, STAGE1, STATUS_COLORS, STATUS_NAMES, ReportStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
_STACK = (NODATA, STAGE1, NOT_SELECTED, SELECTED)  # bottom to top, pipeline order
_CUT_COLOR = "#c92a2a"
_POOL_COLOR = "#ced4da"


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e9ecef", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _stacked_hist(
    ax: Axes, values: NDArray[Any], status: NDArray[np.uint8], bins: NDArray[np.float64]
) -> None:
    """Histogram stacked by state: one filled step outline per state (fast at any N)."""
    bottom = np.zeros(bins.size - 1)
    for s in _STACK:
        v = values[status == s]
        counts = np.histogram(v, bins=bins)[0].astype(np.float64)
        ax.stairs(
            bottom + counts,
            bins,
            baseline=bottom.copy(),
            fill=True,
            color=STATUS_COLORS[s],
            label=f"{STATUS_NAMES[s]} ({v.size:,})",
        )
        bottom += counts


def entropy_histogram(st: ReportStats, entropy: NDArray[Any], path: Path) -> Path:
    """Entropy of the decodable samples, stacked by fate, with the Stage I cut."""
    fig, ax = _figure(8.0, 3.6)
    e = np.asarray(entropy, dtype=np.float64)
    ok = st.status > 0
    _stacked_hist(ax, e[ok], st.status[ok], np.linspace(0.0, 8.0, 81))
    if st.cut is not None:
        name = "lowest kept entropy" if st.cut_label == "entropy ranking" else "Stage I cut"
        ax.axvline(
            st.cut,
            color=_CUT_COLOR,
            linestyle="--",
            linewidth=1.5,
            label=f"{name}: {st.cut:.2f} bits ({st.cut_label})",
        )
    ax.set_xlim(0, 8)
    ax.set_xlabel("grayscale entropy H (bits, 256 levels)")
    ax.set_ylabel("samples")
    ax.set_title("Stage I: image entropy of the pool", loc="left", fontweight="bold")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    return _save(fig, path)


def nodata_histogram(st: ReportStats, nodata: NDArray[Any], path: Path) -> Path:
    """No-data share of the decodable samples (log counts), stacked by fate, with ``max_nodata``."""
    fig, ax = _figure(8.0, 3.2)
    d = np.asarray(nodata, dtype=np.float64)
    ok = st.status > 0
    _stacked_hist(ax, d[ok] * 100.0, st.status[ok], np.linspace(0.0, 100.0, 51))
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    limit = st.config.max_nodata
    if limit is not None:
        ax.axvline(
            limit * 100.0,
            color=_CUT_COLOR,
            linestyle="--",
            linewidth=1.5,
            label=f"max_nodata: {limit * 100:g}%",
        )
    ax.set_xlim(0, 100)
    ax.set_xlabel("no-data pixels (% of the tile)")
    ax.set_ylabel("samples (log)")
    ax.set_title("No-data share of the pool", loc="left", fontweight="bold")
    ax.legend(loc="upper right", frameon=False, fontsize=8)
    return _save(fig, path)


def cluster_occupancy(st: ReportStats, path: Path, labels: list[str] | None = None) -> Path:
    """Samples per reference cluster: pool, Stage I candidates and selection, with the quota q."""
    k = st.num_clusters
    order = np.lexsort((np.arange(k), -st.cluster_pool))  # pool size desc, id asc
    pool, cand, sel = (
        a[order] for a in (st.cluster_pool, st.cluster_candidates, st.cluster_selected)
    )
    fig, ax = _figure(min(max(8.0, 0.32 * k + 1.5), 14.0), 3.8)
    x = np.arange(k)
    ax.bar(x, pool, width=0.9, color=_POOL_COLOR, label=f"decodable pool ({int(pool.sum()):,})")
    ax.bar(
        x,
        cand,
        width=0.9,
        color=STATUS_COLORS[NOT_SELECTED],
        label=f"Stage I candidates ({int(cand.sum()):,})",
    )
    ax.bar(
        x, sel, width=0.55, color=STATUS_COLORS[SELECTED], label=f"selected ({int(sel.sum()):,})"
    )
    if st.quota is not None and st.quota > 0:
        ax.axhline(
            st.quota,
            color=_CUT_COLOR,
            linestyle="--",
            linewidth=1.2,
            label=f"quota q = floor(B/K) = {st.quota:,}",
        )
    nonzero = pool[pool > 0]
    if nonzero.size and nonzero.max() / nonzero.min() > 30:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        ax.set_ylabel("samples (log)")
    else:
        ax.set_ylabel("samples")
    ax.set_xlim(-0.7, k - 0.3)
    if k <= 40:
        ticks = [str(int(c)) if labels is None else f"{int(c)} {labels[int(c)]}" for c in order]
        ax.set_xticks(
            x,
            ticks,
            rotation=60 if labels is not None else 0,
            ha="right" if labels is not None else "center",
            fontsize=8,
        )
        ax.set_xlabel("reference cluster (sorted by pool size)")
    else:
        ax.set_xticks([])
        ax.set_xlabel(
            f"{k} reference clusters, sorted by pool size "
            f"({int(np.count_nonzero(st.cluster_pool))} occupied)"
        )
    covered = int(np.count_nonzero(st.cluster_selected))
    ax.set_title(
        f"Stage II: cluster occupancy, pool vs selection ({covered}/{k} clusters in it)",
        loc="left",
        fontweight="bold",
    )
    ax.legend(loc="upper right", frameon=False, fontsize=8)
    return _save(fig, path)


def similarity_histogram(
    st: ReportStats, similarity: NDArray[Any], path: Path, least_covered_max: float | None = None
) -> Path:
    """Best-centroid cosine similarity of the decodable pool vs the selection."""
    fig, ax = _figure(8.0, 3.4)
    s = np.asarray(similarity, dtype=np.float64)
    ok = st.status > 0
    pool = s[ok]
    sel = s[st.selected]
    lo = float(min(pool.min(), 0.0)) if pool.size else 0.0
    hi = float(pool.max()) if pool.size else 1.0
    bins = np.linspace(lo, max(hi, lo + 1e-3), 61)
    ax.stairs(
        np.histogram(pool, bins=bins)[0],
        bins,
        fill=True,
        color=_POOL_COLOR,
        label=f"decodable pool ({pool.size:,})",
    )
    ax.stairs(
        np.histogram(sel, bins=bins)[0],
        bins,
        fill=True,
        color=STATUS_COLORS[SELECTED],
        alpha=0.85,
        label=f"selected ({sel.size:,})",
    )
    if least_covered_max is not None:
        ax.axvline(
            least_covered_max,
            color=_CUT_COLOR,
            linestyle=":",
            linewidth=1.5,
            label="least-covered tiles shown below this",
        )
    if pool.size:
        ax.axvline(
            float(np.median(pool)),
            color="#343a40",
            linewidth=1.0,
            label=f"pool median {float(np.median(pool)):.3f}",
        )
    ax.set_xlabel("cosine similarity to the nearest reference centroid")
    ax.set_ylabel("samples")
    ax.set_title(
        "Coverage: how well the reference clusters represent the pool",
        loc="left",
        fontweight="bold",
    )
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    return _save(fig, path)
