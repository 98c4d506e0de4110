"""The decode budget: checked from the header before decoding, reduced-resolution decode where the
codec offers it (JPEG DCT scaling, TIFF overviews), ``too_large`` otherwise; peak RSS measured."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import tifffile
from PIL import Image

from rsprune_data.errors import ConfigError, CorruptImageError
from rsprune_data.images import analyze, decode_rgb

MIB = 1 << 20


def _pattern(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 7 % 256, yy * 5 % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


def test_jpeg_beyond_the_budget_is_decoded_with_dct_scaling() -> None:
    rgb = _pattern(2000, 1600)
    data = simplejpeg.encode_jpeg(rgb, quality=90)
    full = analyze(data, "jpg", want_rgb=True)
    assert full.rgb is not None and full.rgb.shape == (2000, 1600, 3)
    small = analyze(data, "jpg", want_rgb=True, max_decoded_bytes=1 * MIB)
    assert small.rgb is not None and small.rgb.shape == (500, 400, 3)  # 1/4: the largest that fits
    assert abs(small.entropy - full.entropy) < 0.5
    assert decode_rgb(data, "jpg", max_decoded_bytes=4 * MIB).shape == (1000, 800, 3)
    # Pillow's path (CMYK JPEG) scales through draft()
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    assert analyze(buf.getvalue(), "jpg", want_rgb=True, max_decoded_bytes=2 * MIB).rgb.shape == (
        500,
        400,
        3,
    )
    with pytest.raises(CorruptImageError, match="even at 1/8 scale") as err:
        analyze(data, "jpg", max_decoded_bytes=10_000)
    assert err.value.reason == "too_large"


def _pyramid(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as t:
        t.write(arr, subifds=2, compression="zlib", tile=(128, 128))
        t.write(arr[::2, ::2].copy(), subfiletype=1, compression="zlib", tile=(128, 128))
        t.write(arr[::4, ::4].copy(), subfiletype=1, compression="zlib", tile=(128, 128))
    return buf.getvalue()


def test_tiff_beyond_the_budget_uses_the_largest_overview_that_fits() -> None:
    arr = np.random.default_rng(0).random((1024, 1024)).astype(np.float32)
    data = _pyramid(arr)
    assert analyze(data, "tif", want_rgb=True).rgb.shape == (1024, 1024, 3)
    assert analyze(data, "tif", want_rgb=True, max_decoded_bytes=2 * MIB).rgb.shape == (512, 512, 3)
    assert analyze(data, "tif", want_rgb=True, max_decoded_bytes=MIB // 2).rgb.shape == (
        256,
        256,
        3,
    )
    with pytest.raises(CorruptImageError, match=r"2 overview\(s\) that fit none") as err:
        analyze(data, "tif", max_decoded_bytes=100_000)
    assert err.value.reason == "too_large"
    plain = io.BytesIO()
    tifffile.imwrite(plain, arr, compression="zlib")
    with pytest.raises(CorruptImageError, match="no overview") as err:
        analyze(plain.getvalue(), "tif", max_decoded_bytes=MIB)
    assert err.value.reason == "too_large" and "--decode-budget" in str(err.value)


def test_png_beyond_the_budget_is_too_large_and_bad_budgets_are_refused() -> None:
    buf = io.BytesIO()
    Image.fromarray(_pattern(600, 600)).save(buf, "PNG")
    assert analyze(buf.getvalue(), "png", max_decoded_bytes=2 * MIB).entropy > 0
    with pytest.raises(CorruptImageError) as err:
        analyze(buf.getvalue(), "png", max_decoded_bytes=MIB)
    assert err.value.reason == "too_large"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_decoded_bytes"):
            analyze(buf.getvalue(), "png", max_decoded_bytes=bad)  # type: ignore[arg-type]


CHILD = r"""
import json, sys
from rsprune_data.errors import CorruptImageError
from rsprune_data.images import analyze

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak := now
before = status("VmRSS")
try:
    st = analyze(data, sys.argv[2], want_rgb=True, max_decoded_bytes=int(sys.argv[3]))
    out = list(st.rgb.shape)
except CorruptImageError as exc:
    out = exc.reason
print(json.dumps({"result": out, "peak_mib": status("VmHWM") - before}))
"""


def _peak(path: Path, ext: str, budget: int) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), ext, str(budget)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_stays_within_the_budget_for_huge_images(tmp_path: Path) -> None:
    """A 12000 x 12000 float32 zlib TIFF (549 MiB decoded, < 2 MB on disk) is refused from its
    header (a few MiB); an 8000 x 8000 grey JPEG (61 MiB) decodes at 1/2 scale (15.3 MiB, RGB
    repeated for the encoder: about 64 MiB peak against about 2.7x the full raster without it)."""
    tif = tmp_path / "big.tif"

    def tiles():  # written tile by tile: the test never holds the raster either
        for i in range(24 * 24):
            yield np.full((512, 512), float(i % 7), np.float32)

    tifffile.imwrite(
        tif, tiles(), shape=(12000, 12000), dtype=np.float32, tile=(512, 512), compression="zlib"
    )
    assert tif.stat().st_size < 2 * MIB
    jpg = tmp_path / "big.jpg"
    jpg.write_bytes(
        simplejpeg.encode_jpeg(np.zeros((8000, 8000, 1), np.uint8) + 90, colorspace="GRAY")
    )
    t = _peak(tif, "tif", 16 * MIB)
    assert t["result"] == "too_large" and t["peak_mib"] < 16, t
    j = _peak(jpg, "jpg", 16 * MIB)
    assert j["result"] == [4000, 4000, 3] and j["peak_mib"] < 100, j  # 1/2 scale: 15.3 MiB grey


def test_indexer_records_too_large_and_the_cli_checks_its_budget(tmp_path: Path, capsys) -> None:
    import webdataset as wds

    from rsprune_data.cli import main as cli_main
    from rsprune_data.index import PruneIndex

    png = io.BytesIO()
    Image.fromarray(_pattern(1000, 800)).save(png, "PNG")  # 2.3 MiB decoded, no reduced decode
    jpg = simplejpeg.encode_jpeg(_pattern(1000, 800))
    shard = tmp_path / "big.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "png", "png": png.getvalue()})
        w.write({"__key__": "jpg", "jpg": jpg})
    out = tmp_path / "r.json"
    assert (
        cli_main(
            [
                "index",
                str(shard),
                "--workers",
                "0",
                "-q",
                "--decode-budget",
                "1",
                "--report-json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert (
        report["invalid"] == {"too_large": 1} and "png" in report["invalid_examples"]["too_large"]
    )
    index = PruneIndex.load([str(shard)])
    assert index.valid.tolist() == [False, True]  # the JPEG was DCT-scaled, not refused
    assert cli_main(["index", str(shard), "--workers", "0", "-q", "--decode-budget", "0"]) == 2
    assert "--decode-budget must be > 0" in capsys.readouterr().err
    assert (
        cli_main(["index", str(shard), "-q", "--report-json", str(tmp_path / "missing" / "r.json")])
        == 2
    )
    assert "its folder does not exist" in capsys.readouterr().err
