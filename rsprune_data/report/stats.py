"""What a report shows, as numbers: per-sample fate, per-cluster and per-shard counts (numpy only).

Every sample of the index ends in exactly one of five states (:data:`STATUS_NAMES`), in pipeline
order: not decodable, dropped for no-data, dropped by Stage I (entropy), a candidate that Stage II
(or a baseline's ranking) left out, selected. The figures colour by state, the contact sheets frame
tiles by state, and ``summary.json`` counts them, so all three agree by construction.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..config import PruneConfig
from ..plan import resolve_stage1, select_with_config, selection_summary, stage1_survivors
from ..selection import budget

INVALID, NODATA, STAGE1, NOT_SELECTED, SELECTED = range(5)
# "no-data dropped" also holds the samples that PruneConfig.where and max_cloud drop
STATUS_NAMES = ("not decodable", "no-data dropped", "Stage I dropped", "not selected", "selected")
#: One colour per state, shared by figures (fills) and contact sheets (tile frames).
STATUS_COLORS = ("#495057", "#868e96", "#e8590c", "#a5d8ff", "#1971c2")


@dataclass
class ReportStats:
    """Everything the report draws, computed once from an index, a config and its selection."""

    config: PruneConfig
    summary: dict[str, Any]  # plan.selection_summary
    selected: NDArray[np.int64]
    status: NDArray[np.uint8]  # one of INVALID..SELECTED per sample
    cut: float | None  # entropy below which eligible samples were dropped (None: no cut)
    cut_label: str
    quota: int | None  # q = floor(B / K) when the index has clusters
    reasons: dict[str, int]  # invalid samples per reason code
    cluster_pool: NDArray[np.int64]  # [K] valid samples per cluster
    cluster_candidates: NDArray[np.int64]  # [K] Stage I survivors per cluster
    cluster_selected: NDArray[np.int64]  # [K]
    shard_samples: NDArray[np.int64]  # [S]
    shard_selected: NDArray[np.int64]  # [S]
    shard_read_bytes: NDArray[np.int64]  # [S] sum of selected byte ranges
    shard_file_bytes: NDArray[np.int64]  # [S] file sizes

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_pool.shape[0])

    def to_json(self, shards: list[str], composition: list[str] | None = None) -> dict[str, Any]:
        """``summary.json``: the selection summary plus stages, I/O and per-cluster counts."""
        out: dict[str, Any] = dict(self.summary)
        out["invalid_reasons"] = dict(self.reasons)
        out["status_counts"] = {
            name: int(c)
            for name, c in zip(
                STATUS_NAMES, np.bincount(self.status, minlength=len(STATUS_NAMES)), strict=True
            )
        }
        out["stage1_cut"] = self.cut
        out["stage1_cut_label"] = self.cut_label
        out["quota"] = self.quota
        out["num_shards"] = len(shards)
        out["shards_touched"] = int(np.count_nonzero(self.shard_selected))
        out["bytes_to_read"] = int(self.shard_read_bytes.sum())
        out["bytes_total"] = int(self.shard_file_bytes.sum())
        out["shards"] = [
            {
                "shard": os.path.basename(s),
                "samples": int(n),
                "selected": int(k),
                "bytes_to_read": int(r),
                "bytes": int(b),
            }
            for s, n, k, r, b in zip(
                shards,
                self.shard_samples,
                self.shard_selected,
                self.shard_read_bytes,
                self.shard_file_bytes,
                strict=True,
            )
        ]
        out["clusters"] = [
            {
                "cluster": k,
                "pool": int(p),
                "candidates": int(c),
                "selected": int(s),
                **({"composition": composition[k]} if composition is not None else {}),
            }
            for k, (p, c, s) in enumerate(
                zip(self.cluster_pool, self.cluster_candidates, self.cluster_selected, strict=True)
            )
        ]
        json.dumps(out)  # fail here, not half-way through writing the file, on a non-JSON value
        return out


def compute_stats(
    index: Any, config: PruneConfig, selected: NDArray[np.int64] | None = None
) -> ReportStats:
    """Per-sample states and per-cluster/per-shard counts for ``config`` on ``index``.

    Args:
        index: a :class:`~rsprune_data.index.PruneIndex` (or anything with its arrays; ``reason``
            and ``reasons``, the per-sample code into the reason names, are optional).
        config: the pruning settings.
        selected: the selection when already computed (default: ``select_with_config``).
    """
    if selected is None:
        selected = select_with_config(index, config)
    selected = np.asarray(selected, dtype=np.int64)
    n = len(index)
    entropy = np.asarray(index.entropy)
    valid = np.asarray(index.valid, dtype=bool)
    st = resolve_stage1(index, config)
    cand = stage1_survivors(entropy, st)  # the plan's own Stage I survivors (one home)
    status = np.full(n, NOT_SELECTED, dtype=np.uint8)
    status[~valid] = INVALID
    status[valid & ~st.eligible] = NODATA
    status[st.eligible & ~cand] = STAGE1
    status[selected] = SELECTED

    cut, label = _stage1_cut(entropy, cand, selected, st.rule, st.entropy_threshold, config)
    k = int(index.num_clusters)
    b = budget(n, config.prune_ratio)
    z = np.asarray(index.cluster_ids)
    if k > 0:
        pool = np.bincount(z[valid], minlength=k)[:k]
        cands = np.bincount(z[cand], minlength=k)[:k]
        sel = np.bincount(z[selected], minlength=k)[:k]
    else:
        pool = cands = sel = np.zeros(0, dtype=np.int64)

    shard_ids = np.asarray(index.shard_ids)
    num_shards = len(index.shards)
    lengths = np.asarray(index.lengths, dtype=np.int64)
    return ReportStats(
        config=config,
        summary=selection_summary(index, config, selected),
        selected=selected,
        status=status,
        cut=cut,
        cut_label=label,
        quota=b // k if k > 0 else None,
        reasons=_count_reasons(
            valid, getattr(index, "reason", None), getattr(index, "reasons", None)
        ),
        cluster_pool=pool.astype(np.int64),
        cluster_candidates=cands.astype(np.int64),
        cluster_selected=sel.astype(np.int64),
        shard_samples=np.diff(np.asarray(index.shard_starts, dtype=np.int64)).astype(np.int64),
        shard_selected=np.bincount(shard_ids[selected], minlength=num_shards).astype(np.int64),
        shard_read_bytes=np.bincount(
            shard_ids[selected], weights=lengths[selected], minlength=num_shards
        ).astype(np.int64),
        shard_file_bytes=np.array([_file_size(s) for s in index.shards], dtype=np.int64),
    )


def _stage1_cut(
    entropy: NDArray[Any],
    cand: NDArray[np.bool_],
    selected: NDArray[np.int64],
    rule: str,
    threshold: float | None,
    config: PruneConfig,
) -> tuple[float | None, str]:
    if rule in ("threshold", "auto") and threshold is not None:
        return float(threshold), ("auto cut" if rule == "auto" else "threshold")
    if rule == "keep":
        if not cand.any():
            return None, "keep (no candidates)"
        return float(entropy[cand].min()), f"top {config.entropy_keep:g} by entropy"
    if config.strategy == "entropy" and selected.size:
        return float(entropy[selected].min()), "entropy ranking"
    return None, "off"


def _count_reasons(
    valid: NDArray[np.bool_], reasons: NDArray[Any] | None, names: list[str] | None
) -> dict[str, int]:
    bad = int((~valid).sum())
    if not bad:
        return {}
    if reasons is None or names is None:
        return {"unknown": bad}
    codes = np.asarray(reasons)[~valid].astype(np.int64)
    out: Counter[str] = Counter()
    for code, count in zip(*np.unique(codes, return_counts=True), strict=True):
        c = int(code)  # names[0] is "ok"; an invalid sample should never carry it
        out[names[c] if 0 < c < len(names) else "unknown"] += int(count)
    return dict(sorted(out.items()))


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # a URL or a moved shard: the report still shows the selected bytes
