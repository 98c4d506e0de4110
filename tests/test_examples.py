"""The README's example scripts run as documented (the DDP one under torchrun with 2 ranks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

EXAMPLES = REPO / "examples"


def run(cmd: list[str]) -> str:
    """stdout of ``cmd``; on failure the assertion shows its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_streaming_example_delivers_each_epochs_budget(tmp_path: Path):
    out = run([sys.executable, str(EXAMPLES / "train_streaming.py"), "--workdir", str(tmp_path)])
    assert re.findall(r"-> (\d+) of 300 samples \(expected (\d+)\)", out) == [
        ("150", "150"),
        ("90", "90"),
        ("45", "45"),
    ]


def test_map_style_ddp_example_under_torchrun(tmp_path: Path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(EXAMPLES / "train_map_style_ddp.py"),
            "--workdir",
            str(tmp_path),
            "--epochs",
            "2",
            "--workers",
            "0",
        ]
    )
    seen = re.findall(
        r"rank (\d) epoch (\d): prune_ratio=([\d.]+) kept (\d+)/300, this rank "
        r"trained on (\d+)",
        out,
    )
    assert sorted(seen) == [
        ("0", "0", "0.5", "150", "75"),
        ("0", "1", "0.7", "90", "45"),
        ("1", "0", "0.5", "150", "75"),
        ("1", "1", "0.7", "90", "45"),
    ]
