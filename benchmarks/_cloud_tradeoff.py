"""Part 3 of ``benchmarks/quality.py`` (``--cloud``): what the opt-in cloud/haze rule removes.

The real pipeline, entropy-only (no encoder needed): ``pack_folder`` of the Harvey pool and of UC
Merced into tar shards, ``index_shards`` (which stores ``score.cloud`` next to entropy and no-data),
then ``PruneIndex.load``. The hidden labels are the first folder of each key. On each pool the
Stage I survivors of the default rules (valid, no-data <= ``max_nodata``, entropy >= the pool's own
auto cut) are the base; for each ``max_cloud`` threshold the table counts the survivors it would
remove: Harvey ``bad_images`` (what it should remove), good Harvey tiles (``damage``,
``no_damage``) and UC Merced tiles (what it should keep), plus the UC Merced class that loses most.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from rsprune_data import PruneConfig, PruneIndex
from rsprune_data.indexer import index_shards
from rsprune_data.pack import pack_folder
from rsprune_data.plan import resolve_stage1

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def _pool(src: Path, cache: Path, name: str, progress: bool) -> tuple[PruneIndex, float]:
    out = cache / "cloud" / name
    shards = sorted(str(p) for p in out.glob("pool-*.tar"))
    if not shards:
        out.parent.mkdir(parents=True, exist_ok=True)
        shards = [
            str(p)
            for p in pack_folder(
                src, out, shard_size=1000, prefix="pool", progress=progress, overwrite=True
            ).shards
        ]
    t0 = time.perf_counter()
    rep = index_shards(shards, workers=2, cloud_score=True, progress=progress)
    seconds = time.perf_counter() - t0 if rep.indexed else float("nan")
    return PruneIndex.load(shards), seconds


def run(pool: Path, reference: Path, cache: Path, out: Path, progress: bool) -> str:
    rows: list[dict[str, Any]] = []
    idx_h, t_h = _pool(pool, cache, "harvey", progress)
    idx_u, t_u = _pool(reference, cache, "ucmerced", progress)
    cfg = PruneConfig(prune_ratio=0.0)
    info: dict[str, Any] = {}
    groups: dict[str, np.ndarray] = {}
    for name, index in (("harvey", idx_h), ("ucmerced", idx_u)):
        st = resolve_stage1(index, cfg)
        surv = st.eligible & (index.entropy >= (st.entropy_threshold or 0.0))
        cls = np.array([k.split("/", 1)[0] for k in index.keys])
        cloud = index.columns["score.cloud"]
        info[name] = {
            "samples": len(index),
            "survivors": int(surv.sum()),
            "auto_cut_bits": st.entropy_threshold,
        }
        if name == "harvey":
            groups["bad"] = cloud[surv & (cls == "bad_images")]
            groups["good"] = cloud[surv & (cls != "bad_images")]
            info["harvey"]["bad_total"] = int((cls == "bad_images").sum())
        else:
            groups["ucm"] = cloud[surv]
            ucm_cls = cls[surv]
    for t in THRESHOLDS:
        worst = max(
            ((float((groups["ucm"][ucm_cls == c] > t).mean()), c) for c in np.unique(ucm_cls)),
            default=(0.0, ""),
        )
        rows.append(
            {
                "max_cloud": t,
                "bad_removed": int((groups["bad"] > t).sum()),
                "bad_survivors": int(groups["bad"].size),
                "good_harvey_removed_share": float((groups["good"] > t).mean()),
                "ucmerced_removed_share": float((groups["ucm"] > t).mean()),
                "ucmerced_worst_class": worst[1],
                "ucmerced_worst_class_share": worst[0],
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_cloud.json").write_text(
        json.dumps(
            {"pools": info, "index_seconds": {"harvey": t_h, "ucmerced": t_u}, "rows": rows},
            indent=2,
        )
    )
    lines = [
        f"Harvey: {info['harvey']['samples']:,} tiles, {info['harvey']['survivors']:,} survive "
        f"entropy (auto cut {info['harvey']['auto_cut_bits']:.2f} bits) + no-data, of them "
        f"{groups['bad'].size} of the {info['harvey']['bad_total']} bad_images; UC Merced: "
        f"{info['ucmerced']['survivors']:,} of {info['ucmerced']['samples']:,} survive.",
        "",
        "| max_cloud | bad_images removed (of surviving) | good Harvey removed | UC Merced removed | UC Merced class hit most |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['max_cloud']:g} | {r['bad_removed']} / {r['bad_survivors']} "
            f"({100 * r['bad_removed'] / max(r['bad_survivors'], 1):.1f}%) | "
            f"{100 * r['good_harvey_removed_share']:.2f}% | {100 * r['ucmerced_removed_share']:.2f}% | "
            f"{r['ucmerced_worst_class']} {100 * r['ucmerced_worst_class_share']:.0f}% |"
        )
    md = "\n".join(lines)
    (out / "quality_cloud.md").write_text(md + "\n")
    return md
