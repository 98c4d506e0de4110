"""From a :class:`PruneConfig` and an index's arrays to a selection and its summary (numpy only).

This is the config layer around :func:`rsprune_data.selection.select_indices`: it folds the no-data
filter, the metadata filters (``where``) and the opt-in cloud/haze rule (``max_cloud``) into the
validity mask, resolves the data-driven Stage I default, and reports per-stage counts.

Eligibility, in this order (each count in the summary is of samples still eligible before it):
decodable (``valid``) -> ``max_nodata`` (Stage I strategies) -> each ``where`` clause (every
strategy: the clauses define the pool) -> ``max_cloud`` (Stage I strategies) -> the entropy rule.

Data-driven Stage I (``entropy_filter="auto"`` with neither ``entropy_keep`` nor
``entropy_threshold``). The paper keeps a fixed 30% by entropy on Git-10M, a global corpus full of
ocean, desert and cloud. On a pool that is not dominated by such tiles a fixed fraction throws away
whole natural scene types (fields, grass, water and forest sit at 5-6.5 bits against 7-7.5 for built-up
scenes) and Stage II then has nothing left to balance. Stage I's job is to remove *junk*, the
low-information outliers of this pool; balancing is Stage II's. So the cut is the pool's own robust
low tail::

    t = clip(median(H) - 3 * 1.4826 * MAD(H), AUTO_MIN_BITS, AUTO_MAX_BITS)

over the valid samples that pass ``max_nodata``. ``1.4826 * MAD`` estimates the standard deviation
of the bulk without being moved by the outliers themselves; 3 of them is the usual outlier fence.
The floor (2 bits: at most ~4 equally used grey levels) always removes blank, saturated and no-data
tiles, even in a pool made mostly of them; the ceiling (4.5 bits) keeps a tight, high-entropy pool
from cutting into real texture. The chosen threshold is reported in the summary.

Measured (``benchmarks/quality.py``, EfficientNet-Lite0, K = 200): on Harvey, UC Merced, their 50/50
and 20/80 mixes and a Harvey pool that is 40% ``bad_images``, the robust fence lands at 4.8-5.3 bits,
so the 4.5-bit ceiling decides the cut on all five; in practice "auto" is "H >= 4.5 bits plus
``max_nodata``". Against the paper's fixed 30% it keeps a fair share of every UC Merced scene class
(the 30% cut keeps less than a tenth of the share of 6 of the 21) and wins most metrics on every pool; it loses on the low-information share where a
pool holds many cloud or haze tiles, whose entropy is that of ordinary tiles (median 6.3 bits): no
global-entropy cut separates them, and fixed fractions remove more of them only by removing 30-70%
of everything.

Near-duplicates (``dedup_threshold = tau``, opt-in, an extension of the method). Stage I survivors
that :mod:`rsprune_data.dedup` marks as near copies of a kept, more central sample of their cluster
are removed before Stage II: the config layer forms the Stage I survivors exactly as
:func:`~rsprune_data.selection.select_indices` would (:func:`stage1_survivors`), drops the
duplicates, and passes the rest as the valid mask of a ``select_indices`` call without Stage I
arguments. The budget still counts the whole index; the summary counts ``duplicates_dropped``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from .config import PruneConfig
from .errors import ConfigError
from .filters import apply_where, format_clause
from .selection import STAGE1_STRATEGIES, budget, select_indices

AUTO_MIN_BITS = 2.0
AUTO_MAX_BITS = 4.5
AUTO_MAD_FENCE = 3.0
_MAD_TO_SIGMA = 1.4826


class IndexArrays(Protocol):
    """What the config layer reads from an index (``PruneIndex`` or anything alike)."""

    entropy: NDArray[Any]
    cluster_ids: NDArray[Any]
    similarity: NDArray[Any]
    valid: NDArray[np.bool_]
    num_clusters: int

    @property
    def nodata(self) -> NDArray[Any] | None: ...

    def __len__(self) -> int: ...


def auto_entropy_threshold(entropy: NDArray[Any]) -> float:
    """The data-driven Stage I cut in bits (see the module docstring).

    Example:
        >>> auto_entropy_threshold(np.array([7.0, 7.1, 6.9, 7.2, 6.8, 0.1]))
        4.5
    """
    e = np.asarray(entropy, dtype=np.float64)
    if e.size == 0:
        return AUTO_MIN_BITS
    med = float(np.median(e))
    mad = float(np.median(np.abs(e - med)))
    cut = med - AUTO_MAD_FENCE * _MAD_TO_SIGMA * mad
    return float(min(max(cut, AUTO_MIN_BITS), AUTO_MAX_BITS))


@dataclass(frozen=True)
class Stage1:
    """How Stage I was resolved for one pool."""

    eligible: NDArray[np.bool_]  # valid, within max_nodata, every where clause and max_cloud
    entropy_keep: float | None
    entropy_threshold: float | None
    rule: str  # "keep", "threshold", "auto" or "none"
    nodata_dropped: int = 0
    where_dropped: tuple[int, ...] = ()  # one count per config.where clause, in order
    cloud_dropped: int = 0


def _columns(index: IndexArrays) -> Mapping[str, NDArray[Any]]:
    return getattr(index, "columns", None) or {}


def resolve_stage1(index: IndexArrays, config: PruneConfig) -> Stage1:
    """Fold the filters into validity (module docstring) and pick Stage I's arguments."""
    eligible = np.asarray(index.valid, dtype=bool)
    uses_stage1 = config.strategy in STAGE1_STRATEGIES
    nodata = index.nodata
    n0 = int(eligible.sum())
    if uses_stage1 and config.max_nodata is not None and nodata is not None:
        eligible = eligible & (nodata <= config.max_nodata)
    n1 = int(eligible.sum())
    eligible, where_dropped = apply_where(eligible, _columns(index), config.where)
    n2 = int(eligible.sum())
    if uses_stage1 and config.max_cloud is not None:
        cloud = _columns(index).get("score.cloud")
        if cloud is None:
            raise ConfigError(
                f"max_cloud={config.max_cloud} needs the score.cloud column, but the index has "
                f"only {sorted(_columns(index)) or 'no optional columns'}: re-run `rsprune-data "
                "index --cloud-score --force` (not --fast-gray) or pass max_cloud=None"
            )
        eligible = eligible & ~(cloud > config.max_cloud)  # NaN (no score) is kept
    rule: tuple[float | None, float | None, str] = (None, None, "none")
    if not uses_stage1 or config.strategy == "entropy":
        pass
    elif config.entropy_keep is not None:
        rule = (config.entropy_keep, None, "keep")
    elif config.entropy_threshold is not None:
        rule = (None, config.entropy_threshold, "threshold")
    elif config.entropy_filter == "auto":
        rule = (None, auto_entropy_threshold(index.entropy[eligible]), "auto")
    return Stage1(
        eligible,
        *rule,
        nodata_dropped=n0 - n1,
        where_dropped=tuple(where_dropped),
        cloud_dropped=n2 - int(eligible.sum()),
    )


def check_servable(index: IndexArrays, config: PruneConfig) -> None:
    """Refuse, before any selection is computed, a config that ``index`` cannot serve (a strategy
    or ``dedup_threshold`` that needs clusters on an entropy-only index). The loaders call it where
    a config is given, so the error names the call, not a DataLoader worker's first sample."""
    if index.num_clusters < 1 and config.strategy not in ("entropy", "random"):
        raise ConfigError(
            f"strategy {config.strategy!r} needs cluster assignments, but the index was built "
            "without centroids: use strategy='entropy' or 'random', or re-run `rsprune-data index "
            "... --centroids centroids.safetensors`"
        )
    if config.dedup_threshold is not None and index.num_clusters < 1:
        raise ConfigError(
            "dedup_threshold needs cluster assignments (duplicates are found "
            "within clusters): index with --centroids FILE --store-embeddings"
        )


def stage1_survivors(entropy: NDArray[Any], st: Stage1) -> NDArray[np.bool_]:
    """Stage I survivors, exactly as :func:`~rsprune_data.selection.select_indices` forms them:
    ``entropy_keep = f`` keeps the ``min(floor(f * N + 0.5), N_eligible)`` eligible samples of
    highest entropy (ties to the lower position), a threshold keeps ``H >= t``."""
    n = entropy.shape[0]
    if st.entropy_keep is not None:
        pos = np.flatnonzero(st.eligible)
        m = min(math.floor(st.entropy_keep * n + 0.5), pos.shape[0])
        order = np.lexsort((pos, -entropy[pos].astype(np.float64)))
        mask = np.zeros(n, dtype=bool)
        mask[pos[order[:m]]] = True
        return mask
    if st.entropy_threshold is not None:
        return st.eligible & (entropy >= st.entropy_threshold)
    return st.eligible.copy()


def _duplicates(index: IndexArrays, config: PruneConfig) -> NDArray[np.bool_]:
    getter = getattr(index, "duplicate_of", None)
    if getter is None:
        raise ConfigError(
            f"dedup_threshold={config.dedup_threshold} needs an index with embeddings "
            "(PruneIndex loaded from files indexed with --store-embeddings, or "
            "PruneIndex.attach_embeddings): drop dedup_threshold or store embeddings"
        )
    return np.asarray(getter(config.dedup_threshold)) >= 0


def _dedup_candidates(
    index: IndexArrays, config: PruneConfig, st: Stage1
) -> tuple[NDArray[np.bool_], int]:
    """Stage I survivors without the near-duplicates, and how many duplicates were dropped."""
    survivors = stage1_survivors(np.asarray(index.entropy), st)
    dup = _duplicates(index, config) & survivors
    return survivors & ~dup, int(dup.sum())


def select_with_config(index: IndexArrays, config: PruneConfig) -> NDArray[np.int64]:
    """Sorted global positions that ``config`` keeps from ``index``."""
    check_servable(index, config)
    st = resolve_stage1(index, config)
    if config.dedup_threshold is not None:
        cand, _ = _dedup_candidates(index, config, st)
        return select_indices(
            index.entropy,
            index.cluster_ids,
            index.similarity,
            num_clusters=max(index.num_clusters, 1),
            prune_ratio=config.prune_ratio,
            valid=cand,
            strategy=config.strategy,
            seed=config.seed,
        )
    return select_indices(
        index.entropy,
        index.cluster_ids,
        index.similarity,
        num_clusters=max(index.num_clusters, 1),
        prune_ratio=config.prune_ratio,
        entropy_keep=st.entropy_keep,
        entropy_threshold=st.entropy_threshold,
        valid=st.eligible,
        strategy=config.strategy,
        seed=config.seed,
    )


def selection_summary(
    index: IndexArrays, config: PruneConfig, selected: NDArray[np.int64] | None = None
) -> dict[str, Any]:
    """Per-stage counts of a selection, as plain JSON types.

    Keys: ``config``, ``samples``, ``budget``, ``invalid``, ``nodata_dropped``, ``where`` (one
    ``{"filter", "dropped"}`` per clause), ``cloud_dropped``, ``stage1_rule``,
    ``entropy_threshold``/``entropy_keep`` (what Stage I used), ``stage1_dropped``,
    ``dedup_threshold``/``duplicates_dropped`` (near copies removed after Stage I), ``candidates``,
    ``selected``, ``shortfall``, ``num_clusters``, ``clusters_in_pool``, ``clusters_covered``.
    """
    if selected is None:
        selected = select_with_config(index, config)
    n = len(index)
    valid = np.asarray(index.valid, dtype=bool)
    st = resolve_stage1(index, config)
    n_valid = int(valid.sum())
    n_eligible = int(st.eligible.sum())
    if st.entropy_keep is not None:
        candidates = min(math.floor(st.entropy_keep * n + 0.5), n_eligible)
    elif st.entropy_threshold is not None:
        candidates = int((st.eligible & (index.entropy >= st.entropy_threshold)).sum())
    else:
        candidates = n_eligible
    duplicates = 0
    if config.dedup_threshold is not None:
        cand, duplicates = _dedup_candidates(index, config, st)
        candidates = int(cand.sum())
    b = budget(n, config.prune_ratio)
    k = int(index.num_clusters)
    covered = in_pool = 0
    if k > 0:
        z = np.asarray(index.cluster_ids)
        in_pool = int(np.count_nonzero(np.bincount(z[valid], minlength=k)))
        covered = int(np.count_nonzero(np.bincount(z[selected], minlength=k)))
    return {
        "config": config.to_dict(),
        "samples": n,
        "budget": b,
        "invalid": n - n_valid,
        "nodata_dropped": st.nodata_dropped,
        "where": [
            {"filter": format_clause(c), "dropped": d}
            for c, d in zip(config.where, st.where_dropped, strict=True)
        ],
        "cloud_dropped": st.cloud_dropped,
        "stage1_rule": st.rule,
        "entropy_threshold": st.entropy_threshold,
        "entropy_keep": st.entropy_keep,
        "stage1_dropped": n_eligible - candidates - duplicates,
        "dedup_threshold": config.dedup_threshold,
        "duplicates_dropped": duplicates,
        "candidates": candidates,
        "selected": int(selected.shape[0]),
        "shortfall": max(0, b - int(selected.shape[0])),
        "num_clusters": k,
        "clusters_in_pool": in_pool,
        "clusters_covered": covered,
    }
