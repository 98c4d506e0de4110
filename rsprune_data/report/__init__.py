"""The pruning report: a static HTML page with PNG figures and contact sheets, and summary.json.

``rsprune-data report SHARD... -o DIR`` calls :func:`write_report`. The folder it writes is
self-contained (HTML + PNGs, inline CSS, no script, no external URL), so it can be copied, zipped
or opened straight from disk.
"""

from __future__ import annotations

from .build import write_report

__all__ = ["write_report"]
