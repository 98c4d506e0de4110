"""The pruning report on real shards of the shipped sample images, checked in a headless browser."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import SAMPLE_DATA
from PIL import Image

from rsprune_data import PruneConfig
from rsprune_data.cli import main as cli_main
from rsprune_data.errors import ConfigError, IndexMismatchError
from rsprune_data.index import PruneIndex
from rsprune_data.indexer import index_shards
from rsprune_data.pack import pack_folder
from rsprune_data.plan import select_with_config, selection_summary
from rsprune_data.report import write_report
from rsprune_data.report.sheets import Tile, render_sheet
from rsprune_data.report.stats import (
    INVALID,
    NODATA,
    NOT_SELECTED,
    SELECTED,
    STAGE1,
    compute_stats,
)

HARVEY = SAMPLE_DATA / "harvey"
UCMERCED = SAMPLE_DATA / "ucmerced"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """The 300 shipped Harvey tiles in 3 shards, plus a small shard with junk: a flat grey tile
    (entropy 0), a black tile (all no-data) and two truncated JPEGs (not decodable)."""
    tmp = tmp_path_factory.mktemp("report-shards")
    res = pack_folder(HARVEY, tmp, shard_size=100, progress=False)
    junk = tmp / "junk-000000.tar"
    good = next(iter(sorted(HARVEY.rglob("*.jpeg")))).read_bytes()
    with wds.TarWriter(str(junk)) as w:
        w.write({"__key__": "junk/flat", "jpg": _jpeg(np.full((64, 64, 3), 128, np.uint8))})
        w.write({"__key__": "junk/black", "jpg": _jpeg(np.zeros((64, 64, 3), np.uint8))})
        w.write({"__key__": "junk/cut1", "jpg": good[: len(good) // 3]})
        w.write({"__key__": "junk/cut2", "jpg": good[:40]})
    return [*map(str, res.shards), str(junk)]


@pytest.fixture(scope="module")
def entropy_index(shards, tmp_path_factory) -> Path:
    idx = tmp_path_factory.mktemp("idx-entropy")
    assert index_shards(shards, index_dir=idx, workers=0, progress=False).ok
    return idx


@pytest.fixture(scope="module")
def cluster_index(shards, tmp_path_factory) -> tuple[Path, Path]:
    """Centroids of the shipped UC Merced subset with the real default encoder (EfficientNet-Lite0,
    64 px to stay fast on CPU), and the shards indexed with them."""
    from rsprune_data.centroids import build_centroids
    from rsprune_data.encoders import load_encoder

    tmp = tmp_path_factory.mktemp("idx-clusters")
    t0 = time.perf_counter()
    enc = load_encoder("efficientnet-lite0", image_size=64, device="cpu")
    cents = build_centroids([UCMERCED], enc, k=12, num_workers=0, progress=False)
    cents.save(tmp / "ucm.centroids.safetensors")
    report = index_shards(
        shards, centroids=cents, encoder=enc, index_dir=tmp, workers=0, progress=False
    )
    assert report.ok
    print(f"centroids + cluster index: {time.perf_counter() - t0:.1f} s")
    return tmp, tmp / "ucm.centroids.safetensors"


def check_summary(summary: dict, index: PruneIndex, config: PruneConfig, shards: list[str]) -> None:
    """The numbers in summary.json agree with the index and the selection."""
    sel = index.select(config)
    assert summary["selected"] == len(sel)
    assert {k: summary[k] for k in selection_summary(index, config)} == json.loads(
        json.dumps(selection_summary(index, config, sel))
    )
    assert summary["bytes_to_read"] == int(index.lengths[sel].sum())
    assert summary["bytes_total"] == sum(os.path.getsize(s) for s in shards)
    assert summary["shards_touched"] == len(np.unique(index.shard_ids[sel]))
    assert summary["num_shards"] == len(shards)
    per_shard = summary["shards"]
    assert [s["selected"] for s in per_shard] == np.bincount(
        index.shard_ids[sel], minlength=len(shards)
    ).tolist()
    assert sum(s["bytes_to_read"] for s in per_shard) == summary["bytes_to_read"]
    status = summary["status_counts"]
    assert sum(status.values()) == summary["samples"] == len(index)
    assert status["not decodable"] == summary["invalid"]
    assert status["no-data dropped"] == summary["nodata_dropped"]
    assert status["Stage I dropped"] == summary["stage1_dropped"]
    assert status["selected"] == summary["selected"]
    assert sum(summary["invalid_reasons"].values()) == summary["invalid"]


def report_images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_entropy_only_report(shards, entropy_index, tmp_path):
    cfg = PruneConfig(prune_ratio=0.5, strategy="entropy")
    t0 = time.perf_counter()
    page = write_report(shards, tmp_path / "rep", cfg, index_dir=entropy_index, progress=False)
    elapsed = time.perf_counter() - t0
    assert page == tmp_path / "rep" / "index.html"
    assert elapsed < 30, f"report took {elapsed:.1f} s for 304 samples"
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    index = PruneIndex.load(shards, entropy_index)
    check_summary(summary, index, cfg, shards)
    assert summary["invalid"] == 2 and summary["num_clusters"] == 0 and summary["clusters"] == []
    assert summary["stage1_cut_label"] == "entropy ranking"
    assert summary["stage1_cut"] == pytest.approx(float(index.entropy[index.select(cfg)].min()))
    html = page.read_text()
    srcs = report_images(html)
    assert {
        "img/entropy.png",
        "img/nodata.png",
        "img/stage1-dropped.png",
        "img/nodata-dropped.png",
    } <= set(srcs)
    assert "img/clusters.png" not in srcs and "without centroids" in html
    for src in srcs:
        assert (tmp_path / "rep" / src).stat().st_size > 1000
    keys = list(index.keys)
    assert not index.valid[keys.index("junk/cut1")] and not index.valid[keys.index("junk/cut2")]
    assert index.nodata[keys.index("junk/black")] == 1.0  # dropped for no-data, not by entropy
    assert index.entropy[keys.index("junk/flat")] == 0.0  # first tile of the dropped sheet
    sheet = Image.open(tmp_path / "rep" / "img" / "stage1-dropped.png")
    assert sheet.size[0] > 300 and sheet.mode == "RGB"


def test_cluster_report_with_composition(shards, cluster_index, tmp_path):
    idx_dir, cents_path = cluster_index
    cfg = PruneConfig(prune_ratio=0.7)  # rsprune, auto Stage I cut
    page = write_report(
        shards,
        tmp_path / "rep",
        cfg,
        index_dir=idx_dir,
        centroids=cents_path,
        max_clusters_shown=5,
        progress=False,
    )
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    index = PruneIndex.load(shards, idx_dir)
    check_summary(summary, index, cfg, shards)
    k = index.num_clusters
    assert k == 12 and summary["quota"] == summary["budget"] // k
    clusters = summary["clusters"]
    assert [c["cluster"] for c in clusters] == list(range(k))
    assert sum(c["pool"] for c in clusters) == int(index.valid.sum())
    assert sum(c["selected"] for c in clusters) == summary["selected"]
    assert sum(c["candidates"] for c in clusters) == summary["candidates"]
    assert sum(c["selected"] > 0 for c in clusters) == summary["clusters_covered"]
    assert all(c["selected"] <= c["candidates"] <= c["pool"] for c in clusters)
    assert all(
        re.match(r"\d+% \w", c["composition"]) or c["composition"] == "no reference images"
        for c in clusters
    )
    html = page.read_text()
    srcs = report_images(html)
    assert {"img/clusters.png", "img/similarity.png", "img/least-covered.png"} <= set(srcs)
    cluster_sheets = [s for s in srcs if s.startswith("img/cluster-")]
    assert 1 <= len(cluster_sheets) <= 5
    top = max(clusters, key=lambda c: (c["pool"], -c["cluster"]))
    assert f"Cluster {top['cluster']}: {top['composition']}" in html
    assert sorted(p.name for p in (tmp_path / "rep" / "img").glob("*.png")) == sorted(
        Path(s).name for s in srcs
    )
    # a second report into the same folder leaves no sheet of the first one behind
    page = write_report(
        shards, tmp_path / "rep", cfg, index_dir=idx_dir, max_clusters_shown=1, progress=False
    )
    assert len(list((tmp_path / "rep" / "img").glob("cluster-*.png"))) == 1
    assert "% " not in page.read_text().split("Cluster ", 1)[1].split("</h3>")[0]  # no centroids


def test_stats_match_the_selection_for_every_stage1_rule():
    rng = np.random.default_rng(0)
    n = 400
    entropy = np.concatenate([rng.uniform(0, 2, 40), rng.normal(6.5, 0.6, n - 40)]).clip(0, 8)
    nodata = np.where(rng.random(n) < 0.1, rng.random(n), 0.0)
    valid = rng.random(n) > 0.03
    z = rng.integers(0, 10, n)
    s = rng.uniform(0.2, 0.9, n)
    index = PruneIndex.from_arrays(
        entropy, z, s, num_clusters=10, valid=valid, nodata=nodata, lengths=np.full(n, 1024)
    )
    for cfg in (
        PruneConfig(prune_ratio=0.8),
        PruneConfig(prune_ratio=0.5, entropy_keep=0.6),
        PruneConfig(prune_ratio=0.2, entropy_threshold=5.0),
        PruneConfig(prune_ratio=0.5, entropy_filter="none", max_nodata=None),
        PruneConfig(prune_ratio=0.5, strategy="nearest"),
    ):
        sel = select_with_config(index, cfg)
        st = compute_stats(index, cfg, sel)
        summ = selection_summary(index, cfg, sel)
        counts = np.bincount(st.status, minlength=5)
        assert counts[INVALID] == summ["invalid"]
        assert counts[NODATA] == summ["nodata_dropped"]
        assert counts[STAGE1] == summ["stage1_dropped"]
        assert counts[NOT_SELECTED] + counts[SELECTED] == summ["candidates"]
        assert counts[SELECTED] == len(sel) and (st.status[sel] == SELECTED).all()
        if cfg.entropy_keep is not None:  # the effective cut: the lowest surviving entropy
            kept = (st.status == NOT_SELECTED) | (st.status == SELECTED)
            assert st.cut == pytest.approx(float(entropy[kept].min()))
            assert (entropy[st.status == STAGE1] <= st.cut).all()
        assert st.cluster_selected.sum() == len(sel)
        assert st.shard_read_bytes.sum() == 1024 * len(sel)


def test_centroids_must_be_those_of_the_index(shards, entropy_index, cluster_index, tmp_path):
    _, cents_path = cluster_index
    with pytest.raises(IndexMismatchError, match="without centroids"):
        write_report(
            shards,
            tmp_path / "a",
            PruneConfig(prune_ratio=0.5, strategy="entropy"),
            index_dir=entropy_index,
            centroids=cents_path,
            progress=False,
        )
    with pytest.raises(ConfigError, match="max_clusters_shown"):
        write_report(
            shards,
            tmp_path / "b",
            PruneConfig(prune_ratio=0.5, strategy="entropy"),
            index_dir=entropy_index,
            max_clusters_shown=-1,
            progress=False,
        )
    with pytest.raises(ConfigError, match="without centroids"):  # rsprune needs clusters
        write_report(
            shards,
            tmp_path / "c",
            PruneConfig(prune_ratio=0.5),
            index_dir=entropy_index,
            progress=False,
        )


def test_page_is_self_contained(shards, entropy_index, tmp_path):
    page = write_report(
        shards,
        tmp_path / "rep",
        PruneConfig(prune_ratio=0.5, strategy="entropy", max_nodata=None),
        index_dir=entropy_index,
        progress=False,
    )
    html = page.read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|data:)""", html)
    assert "url(" not in html
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert not os.path.isabs(ref) and (page.parent / ref).is_file(), ref
    # the folder moves as a whole
    moved = shutil.copytree(page.parent, tmp_path / "moved")
    assert all((moved / s).is_file() for s in report_images(html))


def test_sheet_draws_placeholders_and_fits_captions(tmp_path):
    thumbs: dict[int, np.ndarray | str] = {
        0: np.full((96, 60, 3), 200, np.uint8),
        1: "decode_error",
    }
    tiles = [
        Tile(0, "H 1.00 bits\n" + "a-very-long-key/" * 6, SELECTED),
        Tile(1, "x", INVALID),
        Tile(2, "", NOT_SELECTED),
    ]
    path = render_sheet(tiles, thumbs, tmp_path / "s.png", columns=2)
    img = np.asarray(Image.open(path))
    assert img.shape[1] == 2 * (96 + 6) + 3 * 6 and img.shape[0] > 2 * 96


def test_cli_report(shards, entropy_index, tmp_path, capsys):
    rc = cli_main(
        [
            "report",
            *shards,
            "-o",
            str(tmp_path / "cli"),
            "--index-dir",
            str(entropy_index),
            "--strategy",
            "entropy",
            "--prune-ratio",
            "0.6",
            "-q",
        ]
    )
    assert rc == 0
    assert (tmp_path / "cli" / "index.html").is_file()
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["config"]["prune_ratio"] == 0.6


# --- a real browser ------------------------------------------------------------------------------

_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && e.target.src) || e.type));
}, true);
var _ce = console.error;
console.error = function () { window.__errors.push([].join.call(arguments, " ")); _ce.apply(console, arguments); };
window.addEventListener("load", function () {
  var imgs = [].slice.call(document.images);
  var out = document.createElement("pre");
  out.id = "rs-probe";
  out.textContent = JSON.stringify({errors: window.__errors, images: imgs.map(function (i) {
    return [i.getAttribute("src"), i.complete, i.naturalWidth]; })});
  document.body.appendChild(out);
});
</script>"""


def browser_check(page: Path, tmp: Path) -> dict:
    """Load a probe copy of ``page`` (same folder, so relative paths hold) in headless chromium;
    return the probe's findings plus the console lines chromium logged."""
    probe = page.with_name("_probe.html")
    probe.write_text(page.read_text().replace("<head>", "<head>\n" + _PROBE, 1))
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="rs-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, (
        f"chromium did not finish loading the page (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    import html as _html

    result = json.loads(_html.unescape(found.group(1)))
    result["console"] = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return result


def test_page_renders_in_headless_chromium(shards, cluster_index, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium is required in CI (Debian package `chromium`, installed by .ci/run)"
            )
        pytest.skip("chromium not installed (apt-get install chromium)")
    idx_dir, cents_path = cluster_index
    page = write_report(
        shards,
        tmp_path / "rep",
        PruneConfig(prune_ratio=0.7),
        index_dir=idx_dir,
        centroids=cents_path,
        progress=False,
    )
    result = browser_check(page, tmp_path)
    assert result["errors"] == [] and result["console"] == [], result
    images = result["images"]
    assert len(images) == len(report_images(page.read_text())) >= 8
    bad = [src for src, complete, width in images if not complete or width <= 0]
    assert bad == [], f"images that did not render: {bad}"
    # the probe itself works: a missing image is caught
    broken = page.with_name("broken.html")
    broken.write_text(page.read_text().replace("img/entropy.png", "img/missing.png"))
    result = browser_check(broken, tmp_path)
    assert any(src == "img/missing.png" and width == 0 for src, _, width in result["images"])
    assert any("missing.png" in e for e in result["errors"]), result["errors"]
