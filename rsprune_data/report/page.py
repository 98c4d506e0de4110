"""The report's HTML: one static page, inline CSS, images by relative path, no script, no URL.

Small builders return HTML fragments and :func:`render` puts the page together; every piece of
text that comes from data (shard names, keys, class names) goes through :func:`html.escape`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .picks import Compositions, Sheet
from .stats import NODATA, NOT_SELECTED, SELECTED, STAGE1, STATUS_COLORS, STATUS_NAMES, ReportStats

if TYPE_CHECKING:
    from ..index import PruneIndex

IMG_DIR = "img"  # figures and sheets, referenced by relative path

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#212529;
  margin:0;background:#f8f9fa;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:36px 0 8px;padding-top:12px;border-top:2px solid #e9ecef}
h3{font-size:1.02em;margin:22px 0 6px}
p.sub{color:#495057;margin:0 0 16px}
p.note{color:#495057;font-size:.92em;margin:4px 0 10px}
code{background:#f1f3f5;padding:0 3px;border-radius:3px;font-size:.92em}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #dee2e6;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:1.35em}
.card span{color:#495057;font-size:.85em}
table{border-collapse:collapse;margin:8px 0 12px;font-size:.92em}
th,td{border-bottom:1px solid #e9ecef;padding:3px 12px 3px 0;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.bar{width:220px}
td.bar div{height:10px;border-radius:2px;background:#1971c2}
figure{margin:10px 0 18px}
figure img{max-width:100%;height:auto;border:1px solid #e9ecef}
figcaption{color:#495057;font-size:.9em;margin-top:2px}
.legend span{display:inline-block;margin-right:14px;font-size:.88em}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;
  border-radius:2px}
details{margin:8px 0}
summary{cursor:pointer;color:#1864ab}
.cluster{margin:14px 0 4px}
.cluster h3{margin:0 0 2px}
.warn{background:#fff4e6;border-left:4px solid #e8590c;padding:6px 12px;margin:10px 0}
"""


def esc(text: object) -> str:
    """HTML-escaped ``str(text)``."""
    return html.escape(str(text), quote=True)


def document(title: str, subtitle: str, body: Iterable[str]) -> str:
    """A complete page around ``body`` fragments."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<h1>{esc(title)}</h1>\n<p class="sub">{subtitle}</p>\n'
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def section(anchor: str, title: str, *parts: str) -> str:
    return (
        f'<section id="{esc(anchor)}">\n<h2>{esc(title)}</h2>\n' + "\n".join(parts) + "\n</section>"
    )


def note(html_text: str, cls: str = "note") -> str:
    """A paragraph; ``html_text`` is trusted markup (escape data before passing it)."""
    return (
        f'<p class="{cls}">{html_text}</p>'
        if cls != "warn"
        else f'<div class="warn">{html_text}</div>'
    )


def figure(src: str, alt: str, caption: str = "", width: int | None = None) -> str:
    """An ``<img>`` by relative path with an optional caption (trusted markup)."""
    w = f' width="{width}"' if width else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(src)}" alt="{esc(alt)}"{w}>{cap}</figure>'


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Key numbers as cards: ``(value, label)`` pairs, both plain text."""
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in items)
        + "</div>"
    )


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    numeric: Sequence[bool] | None = None,
    raw: Sequence[bool] | None = None,
) -> str:
    """A table; ``numeric`` right-aligns columns, ``raw`` marks columns holding trusted markup."""
    num = list(numeric) if numeric is not None else [False] * len(header)
    trusted = list(raw) if raw is not None else [False] * len(header)
    head = "".join(
        f"<th{' class=n' if n else ''}>{esc(h)}</th>" for h, n in zip(header, num, strict=True)
    )
    body = []
    for row in rows:
        cells = []
        for v, n, r in zip(row, num, trusted, strict=True):
            cls = ' class="n"' if n else (' class="bar"' if r else "")
            cells.append(f"<td{cls}>{v if r else esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>" + "".join(body) + "</tbody></table>"


def bar(share: float, color: str = "#1971c2") -> str:
    """A proportional CSS bar (``share`` in [0, 1])."""
    pct = max(0.0, min(1.0, share)) * 100
    return f'<div style="width:{pct:.1f}%;background:{color}"></div>'


def details(summary_text: str, inner: str) -> str:
    return f"<details><summary>{esc(summary_text)}</summary>\n{inner}\n</details>"


def status_legend(states: Sequence[int]) -> str:
    """The frame colours of contact-sheet tiles."""
    return (
        '<p class="legend">tile frame: '
        + "".join(
            f'<span><i style="background:{STATUS_COLORS[s]}"></i>{esc(STATUS_NAMES[s])}</span>'
            for s in states
        )
        + "</p>"
    )


# --- the report page --------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable, keeps type checkers happy


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _stage1_text(st: ReportStats, summary: dict[str, Any]) -> str:
    rule = summary["stage1_rule"]
    if rule == "auto":
        return f"auto cut at {summary['entropy_threshold']:.2f} bits (median - 3 MAD, clipped)"
    if rule == "threshold":
        return f"entropy >= {summary['entropy_threshold']:g} bits"
    if rule == "keep":
        cut = f", effective cut {st.cut:.2f} bits" if st.cut is not None else ""
        return f"keep the top {summary['entropy_keep']:g} of N by entropy{cut}"
    return "off" + (
        f" (ranking by entropy keeps H >= {st.cut:.2f} bits)" if st.cut is not None else ""
    )


def _sheet_html(sheet: Sheet) -> str:
    if not sheet.tiles:
        return f"<h3>{esc(sheet.title)}</h3>" + note("(no such tiles in this selection)")
    return (
        f"<h3>{esc(sheet.title)}</h3>"
        + note(esc(sheet.note))
        + figure(f"{IMG_DIR}/{sheet.name}.png", sheet.title)
    )


def _stage_table(st: ReportStats, summary: dict[str, Any]) -> str:
    n = summary["samples"]
    reasons = ", ".join(f"{r}: {c:,}" for r, c in st.reasons.items())
    k = summary["num_clusters"]
    rows: list[tuple[str, int, str]] = [
        ("samples in the index (N)", n, ""),
        ("not decodable (never selected)", summary["invalid"], reasons),
        (
            "dropped: no-data share > max_nodata",
            summary["nodata_dropped"],
            f"max_nodata = {st.config.max_nodata}",
        ),
        *[
            (f"dropped: where {w['filter']}", w["dropped"], "metadata filter (missing values fail)")
            for w in summary.get("where", [])
        ],
        *(
            [
                (
                    "dropped: cloud/haze score > max_cloud",
                    summary.get("cloud_dropped", 0),
                    f"max_cloud = {st.config.max_cloud}",
                )
            ]
            if st.config.max_cloud is not None
            else []
        ),
        ("dropped: Stage I (entropy)", summary["stage1_dropped"], _stage1_text(st, summary)),
        *(
            [
                (
                    "dropped: near-duplicates",
                    summary.get("duplicates_dropped", 0),
                    f"dedup_threshold = {st.config.dedup_threshold}",
                )
            ]
            if st.config.dedup_threshold is not None
            else []
        ),
        ("Stage I candidates", summary["candidates"], ""),
        ("budget B = floor((1 - r) N + 0.5)", summary["budget"], f"r = {st.config.prune_ratio:g}"),
        ("selected", summary["selected"], f"strategy {st.config.strategy}"),
        (
            "shortfall (B - selected)",
            summary["shortfall"],
            "fewer candidates than the budget: nothing is padded" if summary["shortfall"] else "",
        ),
    ]
    body = [
        (label, f"{v:,}", _pct(v, n), bar(v / n if n else 0.0), esc(detail))
        for label, v, detail in rows
    ]
    if k:
        body.append(
            (
                "clusters covered by the selection",
                f"{summary['clusters_covered']:,}",
                _pct(summary["clusters_covered"], k),
                bar(summary["clusters_covered"] / k),
                esc(
                    f"{summary['clusters_in_pool']} of K = {k} occur in the pool; "
                    f"quota q = floor(B/K) = {st.quota}"
                ),
            )
        )
    return table(
        ["stage", "samples", "of N", "", "detail"],
        body,
        numeric=[False, True, True, False, False],
        raw=[False, False, False, True, True],
    )


def render(
    index: PruneIndex,
    st: ReportStats,
    summary: dict[str, Any],
    comp: Compositions | None,
    stage1: list[Sheet],
    clusters: list[Sheet],
    coverage: list[Sheet],
    extra: Sequence[str] = (),
) -> str:
    from .. import __version__

    cfg = st.config
    n, k = summary["samples"], summary["num_clusters"]
    read, total = summary["bytes_to_read"], summary["bytes_total"]
    touched, num_shards = summary["shards_touched"], summary["num_shards"]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = esc(
        f"{n:,} samples in {num_shards:,} shard(s) · prune ratio {cfg.prune_ratio:g} · strategy "
        f"{cfg.strategy} · encoder {index.encoder or 'none (entropy only)'} · K = {k} · "
        f"generated {when} by rsprune_data {__version__}"
    )
    body = [
        cards(
            [
                (f"{summary['selected']:,}", f"selected of {n:,} ({_pct(summary['selected'], n)})"),
                (f"{summary['budget']:,}", "budget B"),
                (f"{summary['shortfall']:,}", "shortfall"),
                (
                    f"{_human_bytes(read)}",
                    f"to read of {_human_bytes(total)} ({_pct(read, total)})",
                ),
                (f"{touched:,} / {num_shards:,}", "shards touched"),
                *([(f"{summary['clusters_covered']} / {k}", "clusters covered")] if k else []),
            ]
        )
    ]
    body.append(section("stages", "Counts per stage", _stage_table(st, summary)))

    legend = status_legend([NODATA, STAGE1, NOT_SELECTED, SELECTED])
    body.append(
        section(
            "stage1",
            "Stage I: information (entropy and no-data)",
            note(
                "Each tile's global Shannon entropy of its 8-bit grayscale histogram, "
                "H = -Σ p<sub>k</sub> log<sub>2</sub> p<sub>k</sub> over 256 levels. Low-entropy "
                f"tiles carry little information. Stage I here: {esc(_stage1_text(st, summary))}."
            ),
            figure(f"{IMG_DIR}/entropy.png", "entropy histogram with the Stage I cut"),
            figure(f"{IMG_DIR}/nodata.png", "no-data share histogram with the max_nodata cut"),
            legend,
            *(_sheet_html(s) for s in stage1),
        )
    )

    if k:
        body.append(
            section(
                "stage2",
                "Stage II: scene-aware clustering and sampling",
                note(
                    f"Every tile is assigned to its nearest of K = {k} reference clusters. Each "
                    f"cluster gives at most its q = floor(B/K) = {st.quota:,} candidates nearest to "
                    "its centroid; the rest of the budget is filled by similarity. Clusters the pool "
                    "over-represents are cut down to the quota, rare ones are kept whole: the "
                    "selection's bars are flatter than the pool's."
                ),
                figure(
                    f"{IMG_DIR}/clusters.png", "cluster occupancy of the pool and the selection"
                ),
                *(_sheet_html(s) for s in clusters),
                details(f"all {k} clusters", _cluster_table(st, comp)),
            )
        )
        body.append(
            section(
                "coverage",
                "Coverage: tiles the reference set does not represent",
                note(
                    "A plain argmax assigns every tile to some cluster, however far it is from all "
                    "of them. Low similarity marks content that the reference set does not cover; "
                    "such tiles are ranked last within their cluster."
                ),
                figure(f"{IMG_DIR}/similarity.png", "best-centroid similarity, pool vs selection"),
                legend,
                *(_sheet_html(s) for s in coverage),
            )
        )
    else:
        body.append(
            section(
                "stage2",
                "Stage II: scene-aware clustering and sampling",
                note(
                    "The index was built without centroids (entropy only), so there are no cluster "
                    "or coverage figures. Build centroids with <code>rsprune-data centroids</code> "
                    "and index with <code>rsprune-data index ... --centroids FILE</code>.",
                    cls="warn",
                ),
            )
        )

    body.extend(extra)  # sections that need stored embeddings (build.py: ratio sweep, duplicates)
    body.append(
        section(
            "io",
            "Reading this selection",
            note(
                f"At prune ratio {cfg.prune_ratio:g} a loader reads {_human_bytes(read)} "
                f"({read:,} bytes) of {_human_bytes(total)} ({_pct(read, total)}) and opens "
                f"{touched:,} of {num_shards:,} shards; shards with nothing selected are never "
                "opened."
            ),
            details(f"per-shard counts ({num_shards:,} shards)", _shard_table(summary)),
        )
    )
    body.append(
        section(
            "config",
            "Configuration",
            f"<pre>{esc(json.dumps(cfg.to_dict(), indent=2))}</pre>",
            note('All numbers are in <a href="summary.json">summary.json</a>.'),
        )
    )
    return document("RS-Prune selection report", subtitle, body)


def _cluster_table(st: ReportStats, comp: Compositions | None) -> str:
    order = np.lexsort((np.arange(st.num_clusters), -st.cluster_pool))
    rows = [
        (
            int(c),
            f"{st.cluster_pool[c]:,}",
            f"{st.cluster_candidates[c]:,}",
            f"{st.cluster_selected[c]:,}",
            comp.text[c] if comp is not None else "",
        )
        for c in order.tolist()
    ]
    return table(
        ["cluster", "pool", "candidates", "selected", "reference composition"],
        rows,
        numeric=[True, True, True, True, False],
    )


def _shard_table(summary: dict[str, Any], limit: int = 500) -> str:
    shards = summary["shards"]
    rows = [
        (
            s["shard"],
            f"{s['samples']:,}",
            f"{s['selected']:,}",
            _human_bytes(s["bytes_to_read"]),
            _human_bytes(s["bytes"]),
        )
        for s in shards[:limit]
    ]
    more = (
        note(f"... and {len(shards) - limit:,} more in summary.json") if len(shards) > limit else ""
    )
    return (
        table(
            ["shard", "samples", "selected", "to read", "size"],
            rows,
            numeric=[False, True, True, True, True],
        )
        + more
    )


def sweep_section(sw: Any, dup_sheet: Sheet | None) -> str:
    """The ratio sweep (figure + table) and the near-duplicate sheet (report/sweep.py)."""
    rows = [
        (
            f"{r:g}" + (" (chosen)" if r == sw.chosen else ""),
            f"{n:,}",
            *(f"{sw.values[m][i]:.3f}" for m in ("coverage", "balance", "frechet", "radius")),
        )
        for i, (r, n) in enumerate(zip(sw.ratios, sw.selected, strict=True))
    ]
    parts = [
        note(
            "The same configuration at other pruning ratios, measured on the stored "
            "embeddings before any training: where coverage and balance drop and the "
            f"Frechet distance (target: {esc(sw.target)}) and k-center radius rise, "
            "quality falls off. The dashed line marks the chosen ratio."
        ),
        figure(f"{IMG_DIR}/ratio-sweep.png", "metrics over the pruning ratio"),
        table(["ratio", "selected", "coverage", "balance", "Frechet", "radius"], rows),
    ]
    if dup_sheet is not None:
        parts.append(_sheet_html(dup_sheet))
    return section("sweep", "Choosing the ratio: sweep and near-duplicates", *parts)
