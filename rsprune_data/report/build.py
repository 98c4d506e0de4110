"""`write_report`: index + config -> a folder with ``index.html``, PNG figures and ``summary.json``.

Steps::

    PruneIndex.load -> select_with_config -> compute_stats         (stats.py: numbers, numpy only)
      -> the tiles each contact sheet shows                         (picks.py: positions, captions)
      -> read_thumbnails (only those tiles, by byte range)          (sheets.py: a few dozen reads)
      -> render sheets, draw figures                                (sheets.py, figures.py: PNGs)
      -> the page and summary.json                                  (page.py)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .._fsio import atomic_folder
from .._validate import check_int, check_output_dir
from ..config import PruneConfig
from ..errors import ConfigError, IndexMismatchError
from . import page, picks
from .page import IMG_DIR
from .stats import ReportStats, compute_stats

if TYPE_CHECKING:
    from ..centroids import Centroids
    from ..index import PruneIndex

SHEET_TAU = 0.95  # near-duplicate sheet when the config has no dedup_threshold


def write_report(
    shards: Sequence[str | os.PathLike[str]] | str,
    out_dir: str | os.PathLike[str],
    config: PruneConfig,
    *,
    index_dir: str | os.PathLike[str] | None = None,
    centroids: str | os.PathLike[str] | Centroids | None = None,
    max_clusters_shown: int = 12,
    tiles_per_cluster: int = 8,
    reference_embeddings: NDArray[Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write a report that shows what ``config`` keeps and drops from ``shards``.

    The folder ``out_dir`` gets ``index.html`` (a static page: inline CSS, no script, no external
    URL), its PNG figures and contact sheets under ``img/``, and ``summary.json`` (the numbers).

    Args:
        shards: the indexed tar shards, in the order that defines global positions (or one
            brace pattern, ``"shard-{000000..000099}.tar"``).
        out_dir: output folder, published whole: the report is built in a temporary sibling
            folder and renamed into place when complete (files fsynced), so an interrupted run
            leaves the earlier report untouched, never a mix of two. An existing folder is
            replaced only when it is empty or holds an earlier report (``summary.json``).
        config: the pruning settings to judge.
        index_dir: where the indexes are (default: beside each shard).
        centroids: the centroids the index was built with (path or
            :class:`~rsprune_data.centroids.Centroids`); adds each cluster's reference-class
            composition ("cluster 17: 80% forest, 20% river").
        max_clusters_shown: contact sheets for this many of the most populated clusters.
        tiles_per_cluster: kept tiles shown per cluster (nearest to the centroid first).
        reference_embeddings: ``[m, d]`` embeddings of the reference set, the target of the ratio
            sweep's Frechet distance (default: the pool itself). The sweep and the near-duplicate
            sheet appear when the shards were indexed with ``--store-embeddings``.
        progress: show a progress bar while tiles are read.

    Returns:
        The path of ``index.html``.

    Raises:
        IndexNotFoundError, StaleIndexError, IndexMismatchError: as :meth:`PruneIndex.load`;
            IndexMismatchError also when ``centroids`` are not those the index was built with.
        ConfigError: ``config`` needs clusters the index does not have, a bad argument, or
            ``out_dir`` is a file, has no parent folder, is not writable or holds other files.

    Example:
        >>> write_report(["shard-000000.tar"], "report", PruneConfig(prune_ratio=0.85))  # doctest: +SKIP
        PosixPath('report/index.html')
    """
    from ..index import PruneIndex
    from ..plan import select_with_config

    max_clusters_shown = check_int("max_clusters_shown", max_clusters_shown, 0)
    tiles_per_cluster = check_int("tiles_per_cluster", tiles_per_cluster, 0)
    final = _check_out_dir(out_dir)
    t0 = time.perf_counter()
    index = PruneIndex.load(
        shards if isinstance(shards, str | os.PathLike) else list(shards), index_dir
    )
    cents = _load_centroids(centroids, index)
    selected = select_with_config(index, config)
    st = compute_stats(index, config, selected)
    with atomic_folder(final) as out:
        _write_all(
            out,
            index,
            config,
            selected,
            st,
            cents,
            max_clusters_shown,
            tiles_per_cluster,
            reference_embeddings,
            t0,
            progress,
        )
    return final / "index.html"


def _write_all(
    out: Path,
    index: PruneIndex,
    config: PruneConfig,
    selected: NDArray[np.int64],
    st: ReportStats,
    cents: Centroids | None,
    max_clusters_shown: int,
    tiles_per_cluster: int,
    reference_embeddings: NDArray[Any] | None,
    t0: float,
    progress: bool,
) -> None:
    """Every file of the report, into the (temporary) folder ``out``."""
    from . import figures
    from .sheets import read_thumbnails, render_sheet

    img = out / IMG_DIR
    img.mkdir()
    comp = picks.compositions(cents) if cents is not None else None
    stage1 = picks.stage1_sheets(index, st)
    clusters = picks.cluster_sheets(index, st, comp, max_clusters_shown, tiles_per_cluster)
    coverage = picks.coverage_sheets(index, st) if index.num_clusters > 0 else []
    emb = _stored_embeddings(index)
    dup_sheet = None
    if emb is not None and index.num_clusters > 0:
        from .sweep import duplicate_tiles

        tau = config.dedup_threshold if config.dedup_threshold is not None else SHEET_TAU
        dup_sheet = picks.Sheet(
            "near-duplicates",
            f"Near-duplicate groups at cosine >= {tau:g}",
            "The largest groups of near copies within a reference cluster: the most central "
            "sample (kept by dedup_threshold) first, then the samples it stands for.",
            duplicate_tiles(index, index.duplicate_of(tau), selected),
        )
    sheets = [
        s for s in (*stage1, *clusters, *coverage, *([dup_sheet] if dup_sheet else [])) if s.tiles
    ]
    thumbs = read_thumbnails(index, [t.pos for s in sheets for t in s.tiles], progress=progress)
    for s in sheets:
        render_sheet(s.tiles, thumbs, img / f"{s.name}.png")

    figures.entropy_histogram(st, index.entropy, img / "entropy.png")
    figures.nodata_histogram(st, index.nodata, img / "nodata.png")
    least_max = None
    if index.num_clusters > 0:
        short = comp.short if comp is not None else None
        figures.cluster_occupancy(st, img / "clusters.png", labels=short)
        if coverage and coverage[0].tiles:
            least_max = float(index.similarity[coverage[0].tiles[-1].pos])
        figures.similarity_histogram(st, index.similarity, img / "similarity.png", least_max)

    extra: list[str] = []
    summary = st.to_json(index.shards, comp.text if comp is not None else None)
    if emb is not None and index.num_clusters > 0:
        from .sweep import ratio_sweep, sweep_figure

        sw = ratio_sweep(index, config, emb, reference=reference_embeddings)
        sweep_figure(sw, img / "ratio-sweep.png")
        summary["ratio_sweep"] = sw.to_json()
        extra.append(page.sweep_section(sw, dup_sheet))
    summary["report_seconds"] = round(time.perf_counter() - t0, 3)
    html = page.render(index, st, summary, comp, stage1, clusters, coverage, extra)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "index.html").write_text(html, encoding="utf-8")


def _check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` checked before any work: a writable place that holds no foreign files."""
    out = check_output_dir("out_dir", out_dir)
    if out.is_dir():
        foreign = any(out.iterdir()) and not (out / "summary.json").is_file()
        if foreign:
            raise ConfigError(
                f"`out_dir`={os.fspath(out_dir)!r} is a folder with other files in it (no "
                "summary.json of an earlier report): the report replaces its folder as a whole, so "
                "choose a new or empty folder"
            )
    return out


def _stored_embeddings(index: PruneIndex) -> NDArray[Any] | None:
    from ..dedup_cache import load_embeddings
    from ..embeddings import read_metadata, sidecar_path_of_index

    if not index.index_paths or not all(
        read_metadata(sidecar_path_of_index(p)) for p in index.index_paths
    ):
        return None
    return load_embeddings(index)


def _load_centroids(
    centroids: str | os.PathLike[str] | Centroids | None, index: PruneIndex
) -> Centroids | None:
    if centroids is None:
        return None
    from ..centroids import Centroids

    cents = centroids if isinstance(centroids, Centroids) else Centroids.load(centroids)
    if index.num_clusters == 0:
        raise IndexMismatchError(
            "centroids were given but the index was built without centroids (entropy only): "
            "drop --centroids, or index with `rsprune-data index ... --centroids FILE` first"
        )
    if cents.digest != index.centroids_digest:
        raise IndexMismatchError(
            f"centroids digest {cents.digest} differs from the index's {index.centroids_digest!r}: "
            "pass the centroids file the shards were indexed with"
        )
    return cents


__all__ = ["write_report"]
