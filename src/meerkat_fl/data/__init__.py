"""Data shipped inside the package, laid out like shared/data, so the demo runs offline on a bare machine.

Searched after a user's data directory (see tasks/task.py); README.md in this folder gives each file's source,
licence and the recipe that made it (scripts/build_demo_data.py rebuilds them).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DATA_DIR = Path(__file__).resolve().parent
BUNDLED_CALIBRATION = BUNDLED_DATA_DIR / "calibration" / "wikitext-2"
