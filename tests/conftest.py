from __future__ import annotations

import os
import sys
from pathlib import Path

# tests import helpers such as reference_selection.py from this folder
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "examples" / "data"
