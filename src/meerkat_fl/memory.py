"""Resident memory of this process, for benchmarks and memory tests (Linux /proc; NaN elsewhere).

Loading a model peaks at about twice the steady RSS, so the lifetime peak (``ru_maxrss``) says nothing about
what a workload needs. ``reset_peak`` lowers the kernel's high-water mark to the current RSS; ``peak_mb`` then
reads the peak since that reset.
"""

from __future__ import annotations

import math
import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float:
    try:
        text = _STATUS.read_text()
    except OSError:
        return float("nan")
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def rss_mb() -> float:
    """Current resident set size, MB."""
    return _status_mb("VmRSS")


def lifetime_peak_mb() -> float:
    """Peak RSS since the process started (``ru_maxrss``, kB on Linux), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0, /proc/self/clear_refs "5"); False where
    unsupported, in which case ``peak_mb`` falls back to the lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS since the last ``reset_peak`` (or since start), MB."""
    peak = _status_mb("VmHWM")
    return lifetime_peak_mb() if math.isnan(peak) else peak
