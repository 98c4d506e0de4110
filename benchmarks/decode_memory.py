"""Peak memory of one image's Stage I analysis, with the decode budget against without it.

    python benchmarks/decode_memory.py [--tiff-size 16000] [--jpeg-size 10000] [--at-budget]
        [--out results/decode_memory.json]

Each case runs ``rsprune_data.images.analyze`` (``want_rgb=True``, what the indexer does with an
encoder) on one file in a fresh Python process and reports that process's peak RSS growth
(``ru_maxrss`` after minus before the call) and wall time. The yardstick is the same call with
``max_decoded_bytes=None`` (no budget: the behaviour before the budget existed), measured in the
same run. Files, written once to ``--cache`` without holding the raster in memory:

* a zlib float32 GeoTIFF of ``--tiff-size``^2 pixels (tiled, near-constant: ~1 MB on disk, 1 GiB
  decoded at 16000): refused as ``too_large`` from its header with the budget;
* the same raster with a 2x/4x/8x SubIFD overview pyramid: decoded from the largest overview that fits;
* a ``--jpeg-size``^2 RGB JPEG: decoded with libjpeg-turbo's DCT scaling with the budget;
* ``--at-budget``: a float32 TIFF and an RGB JPEG just under the default budget, decoded at full
  size, to measure peak RSS per decoded byte (the multiplier the default budget is sized from).

This is a 2-core shared machine: times vary between runs; peak RSS does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CHILD = r"""
import json, sys, time
from rsprune_data.errors import CorruptImageError
from rsprune_data.images import analyze

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MiB
path, ext, budget = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(path, "rb").read()
analyze(open(sys.argv[4], "rb").read(), "png")  # warm up: lazy imports are not the image's cost
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak) to the current RSS
before = status("VmRSS")
t0 = time.perf_counter()
try:
    st = analyze(data, ext, want_rgb=True, max_decoded_bytes=None if budget == "none" else int(budget))
    result = {"entropy": st.entropy, "rgb_shape": list(st.rgb.shape)}
except CorruptImageError as exc:
    result = {"reason": exc.reason}
dt = time.perf_counter() - t0
print(json.dumps({**result, "seconds": dt, "peak_growth_mib": status("VmHWM") - before}))
"""


def _tiles(size: int, tile: int) -> Any:
    n = -(-size // tile)
    for i in range(n * n):  # one value per tile: compresses to almost nothing, as no-data does
        yield np.full((tile, tile), 100.0 + (i * 37) % 101, np.float32)


def write_tiff(path: Path, size: int, *, overviews: bool) -> None:
    import tifffile

    tile = 512
    with tifffile.TiffWriter(path, bigtiff=True) as t:
        t.write(
            _tiles(size, tile),
            shape=(size, size),
            dtype=np.float32,
            tile=(tile, tile),
            compression="zlib",
            subifds=3 if overviews else 0,
        )
        if overviews:
            for f in (2, 4, 8):
                s = -(-size // f)
                t.write(
                    _tiles(s, tile),
                    shape=(s, s),
                    dtype=np.float32,
                    tile=(tile, tile),
                    compression="zlib",
                    subfiletype=1,
                )


def write_jpeg(path: Path, size: int) -> None:
    import simplejpeg

    yy, xx = np.mgrid[0:size, 0:size].astype(np.uint16)
    rgb = np.stack([(xx * 7 % 256), (yy * 5 % 256), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    del yy, xx
    path.write_bytes(simplejpeg.encode_jpeg(rgb, quality=85))


def _tiny_png(cache: Path) -> Path:
    from PIL import Image

    path = cache / "tiny.png"
    if not path.exists():
        Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def run_case(path: Path, ext: str, budget: int | None) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(path),
            ext,
            "none" if budget is None else str(budget),
            str(_tiny_png(path.parent)),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode:
        return {
            "error": r.stderr.strip().splitlines()[-1] if r.stderr else f"exit {r.returncode}",
            "wall_seconds": time.perf_counter() - t0,
        }
    return json.loads(r.stdout)


def main() -> None:
    from rsprune_data.images import DEFAULT_DECODE_BUDGET

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiff-size", type=int, default=16000)
    ap.add_argument("--jpeg-size", type=int, default=10000)
    ap.add_argument("--at-budget", action="store_true")
    ap.add_argument(
        "--no-yardstick",
        action="store_true",
        help="skip the unbudgeted runs (they need several GB)",
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rsprune_bench/decode_memory"))
    ap.add_argument("--out", type=Path, default=Path("results/decode_memory.json"))
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    budget = DEFAULT_DECODE_BUDGET
    cases: list[tuple[str, Path, str, int]] = []  # name, file, ext, decoded bytes at full size
    files = {
        "tiff_f32": (args.cache / f"f32-{args.tiff_size}.tif", "tif", args.tiff_size**2 * 4),
        "tiff_f32_overviews": (
            args.cache / f"f32-{args.tiff_size}-ovr.tif",
            "tif",
            args.tiff_size**2 * 4,
        ),
        "jpeg_rgb": (args.cache / f"rgb-{args.jpeg_size}.jpg", "jpg", args.jpeg_size**2 * 3),
    }
    if args.at_budget:
        side_f = int((budget / 4) ** 0.5) // 8 * 8
        side_j = int((budget / 3) ** 0.5) // 8 * 8
        files["tiff_f32_at_budget"] = (args.cache / f"f32-{side_f}.tif", "tif", side_f**2 * 4)
        files["jpeg_rgb_at_budget"] = (args.cache / f"rgb-{side_j}.jpg", "jpg", side_j**2 * 3)
    for name, (path, ext, nbytes) in files.items():
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            if ext == "tif":
                size = int((nbytes / 4) ** 0.5)
                write_tiff(path, size, overviews=name.endswith("overviews"))
            else:
                write_jpeg(path, int((nbytes / 3) ** 0.5))
        cases.append((name, path, ext, nbytes))
    rows = []
    print(
        f"decode budget {budget / 2**20:.0f} MiB; peak RSS growth of one analyze() call, "
        "fresh process each (2-core shared machine: times vary)"
    )
    for name, path, ext, nbytes in cases:
        row: dict[str, Any] = {
            "case": name,
            "file_bytes": path.stat().st_size,
            "decoded_bytes_full": nbytes,
            "budget": run_case(path, ext, budget),
        }
        if not args.no_yardstick:
            row["no_budget"] = run_case(path, ext, None)
        b = row["budget"]
        line = (
            f"{name:22s} {path.stat().st_size / 1e6:7.1f} MB file, {nbytes / 2**20:7.0f} MiB "
            f"decoded: budget -> {b.get('reason') or b.get('rgb_shape')} peak +"
            f"{b.get('peak_growth_mib', float('nan')):7.1f} MiB {b.get('seconds', 0):6.2f} s"
        )
        if "no_budget" in row:
            n = row["no_budget"]
            peak = n.get("peak_growth_mib", float("nan"))
            line += (
                f" | no budget -> {n.get('reason') or n.get('rgb_shape') or n.get('error')} "
                f"peak +{peak:7.1f} MiB {n.get('seconds', 0):6.2f} s, "
                f"ratio {peak / max(b.get('peak_growth_mib', 1.0), 1.0):6.1f}x; "
                f"peak / decoded {peak * 2**20 / nbytes:4.2f}"
            )
        print(line, flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "cpus": os.cpu_count(),
                "budget": budget,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
