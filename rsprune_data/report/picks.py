"""Which tiles each contact sheet shows, with their captions (numpy only; no image is read here).

Every sheet is a :class:`Sheet`: a file name, a title, a note for the page and its tiles in order.
Orders are by value with ties to the lower position, so a report of the same index and config
always shows the same tiles; only partial sorts run, so sheets of a 10M-sample index stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .sheets import Tile
from .stats import INVALID, NODATA, NOT_SELECTED, SELECTED, STAGE1, ReportStats

if TYPE_CHECKING:
    from ..centroids import Centroids
    from ..index import PruneIndex

SHEET_TILES = 24  # tiles of a Stage I / coverage sheet (3 rows of 8)


@dataclass
class Sheet:
    """One contact sheet to draw: file name, title, explanatory note and its tiles."""

    name: str
    title: str
    note: str
    tiles: list[Tile] = field(default_factory=list)


@dataclass(frozen=True)
class Compositions:
    text: list[str]  # per cluster: "80% forest, 20% river"
    short: list[str]  # per cluster: the dominant class, for axis labels


def compositions(cents: Centroids, top: int = 3, min_share: float = 0.05) -> Compositions:
    """Reference-class composition of each cluster, largest shares first."""
    text, short = [], []
    for row in np.asarray(cents.composition, dtype=np.float64):
        order = np.argsort(-row, kind="stable")
        parts = [(row[i], cents.class_names[i]) for i in order[:top] if row[i] >= min_share]
        if not parts:
            text.append("no reference images")
            short.append("-")
            continue
        rest = 1.0 - sum(v for v, _ in parts)
        words = [f"{v * 100:.0f}% {name}" for v, name in parts]
        if rest >= 0.005:
            words.append(f"{rest * 100:.0f}% other")
        text.append(", ".join(words))
        short.append(parts[0][1][:14])
    return Compositions(text, short)


def ordered(
    values: NDArray[Any],
    mask: NDArray[np.bool_],
    descending: bool = False,
    limit: int | None = None,
) -> NDArray[np.int64]:
    """Positions where ``mask`` holds, by value (ties to the lower position); the first ``limit``.

    With a ``limit`` only a partial sort runs, so a sheet of a 10M-sample index stays cheap.
    """
    pos = np.flatnonzero(mask)
    v = values[pos].astype(np.float64)
    if descending:
        v = -v
    if limit is not None and pos.size > limit:
        kth = np.partition(v, limit - 1)[limit - 1]
        keep = v <= kth  # every value up to the limit-th smallest, ties included
        pos, v = pos[keep], v[keep]
    out = pos[np.lexsort((pos, v))]
    kept: NDArray[np.int64] = out if limit is None else out[:limit]
    return kept


def spread(pos: NDArray[np.int64], m: int) -> NDArray[np.int64]:
    """``m`` positions evenly spaced along an ordered list (its first and last included)."""
    if pos.size <= m:
        return pos
    return pos[np.unique(np.linspace(0, pos.size - 1, m).round().astype(np.int64))]


def _tiles(index: PruneIndex, st: ReportStats, pos: NDArray[np.int64], first: Any) -> list[Tile]:
    """Tiles with caption ``first(position)`` over the sample's key (the sheet shortens it)."""
    keys = index.keys
    return [
        Tile(int(p), f"{first(int(p))}\n{keys[int(p)]}", int(st.status[p])) for p in pos.tolist()
    ]


def stage1_sheets(index: PruneIndex, st: ReportStats) -> list[Sheet]:
    e = np.asarray(index.entropy)
    nd = np.asarray(index.nodata)
    dropped = (st.status == STAGE1) | (st.status == NOT_SELECTED)
    low = ordered(e, dropped, limit=SHEET_TILES)
    sheets = [
        Sheet(
            "stage1-dropped",
            "Lowest-entropy dropped tiles",
            "The dropped tiles (Stage I, or left out by Stage II) with the lowest entropy, lowest "
            "first. These should be blank, cloud, water or no-data tiles; real scenes here mean "
            "the cut is too high.",
            _tiles(index, st, low, lambda p: f"H {e[p]:.2f} bits"),
        )
    ]
    if st.cut is not None:
        above = ordered(
            e, ((st.status == NOT_SELECTED) | (st.status == SELECTED)) & (e >= st.cut), limit=16
        )
        sheets.append(
            Sheet(
                "stage1-above-cut",
                "Just above the cut: the lowest-entropy tiles that survive it",
                f"The tiles closest to the entropy cut ({st.cut:.2f} bits, {st.cut_label}) on the kept "
                "side, lowest first. Junk here means the cut is too low.",
                _tiles(index, st, above, lambda p: f"H {e[p]:.2f} bits"),
            )
        )
    limit = st.config.max_nodata
    by_nodata = st.status == NODATA
    if limit is not None:  # NODATA also holds the `where` and max_cloud drops
        by_nodata &= nd > limit
    nodata = spread(ordered(nd, by_nodata), 16)
    sheets.append(
        Sheet(
            "nodata-dropped",
            "Dropped for no-data",
            "max_nodata is off."
            if limit is None
            else f"Tiles with more than {limit * 100:g}% no-data pixels, evenly spread from the cut (left) "
            "to the most no-data (right).",
            _tiles(index, st, nodata, lambda p: f"no-data {nd[p] * 100:.0f}%"),
        )
    )
    cloud = getattr(index, "columns", {}).get("score.cloud")
    if st.config.max_cloud is not None and cloud is not None:
        by_cloud = (st.status == NODATA) & (cloud > st.config.max_cloud) & ~by_nodata
        sheets.append(
            Sheet(
                "cloud-dropped",
                "Dropped as cloud or haze",
                f"Tiles whose cloud/haze score (share of bright, colourless, flat 8x8 blocks) exceeds "
                f"max_cloud = {st.config.max_cloud:g}, evenly spread from the cut (left) to the "
                "cloudiest (right).",
                _tiles(
                    index,
                    st,
                    spread(ordered(cloud, by_cloud), 16),
                    lambda p: f"cloud {cloud[p] * 100:.0f}%",
                ),
            )
        )
    return sheets


def cluster_sheets(
    index: PruneIndex,
    st: ReportStats,
    comp: Compositions | None,
    max_clusters: int,
    per_cluster: int,
) -> list[Sheet]:
    if index.num_clusters == 0 or per_cluster == 0:
        return []
    z = np.asarray(index.cluster_ids)
    s = np.asarray(index.similarity)
    order = np.lexsort((np.arange(st.num_clusters), -st.cluster_pool))
    sel = st.status == SELECTED
    sheets = []
    for k in order[:max_clusters].tolist():
        if st.cluster_pool[k] == 0:
            break
        near = ordered(s, sel & (z == k), descending=True, limit=per_cluster)
        what = f": {comp.text[k]}" if comp is not None else ""
        sheets.append(
            Sheet(
                f"cluster-{k:04d}",
                f"Cluster {k}{what}",
                f"pool {st.cluster_pool[k]:,} · Stage I candidates {st.cluster_candidates[k]:,} · "
                f"selected {st.cluster_selected[k]:,}"
                + (" (none kept)" if not near.size else " · kept tiles nearest the centroid"),
                _tiles(index, st, near, lambda p: f"s {s[p]:.3f}"),
            )
        )
    return sheets


def coverage_sheets(index: PruneIndex, st: ReportStats) -> list[Sheet]:
    s = np.asarray(index.similarity)
    z = np.asarray(index.cluster_ids)
    least = ordered(s, st.status != INVALID, limit=SHEET_TILES)
    return [
        Sheet(
            "least-covered",
            "Least-covered pool tiles",
            "The decodable pool tiles least similar to every reference centroid, least first; the "
            "caption gives the similarity s and the cluster the argmax forced them into. Content "
            "here is what the reference set does not represent.",
            _tiles(index, st, least, lambda p: f"s {s[p]:.3f} → c{z[p]}"),
        )
    ]
