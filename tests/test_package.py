"""The public surface: a sorted __all__ that resolves, and a cheap import."""

from __future__ import annotations

import subprocess
import sys

import rsprune_data


def test_all_is_sorted_and_resolves():
    assert rsprune_data.__all__ == sorted(rsprune_data.__all__)
    for name in rsprune_data.__all__:
        assert getattr(rsprune_data, name) is not None


def test_import_is_cheap():
    code = (
        "import sys, rsprune_data; heavy = [m for m in ('torch', 'webdataset', 'faiss', "
        "'matplotlib', 'timm', 'open_clip', 'transformers') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "rsprune_data.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "rsprune-data" in out.stdout
