"""Progress bars: one constructor for every loop that shows one (rounds, steps, sweep points, evaluation
batches, calibration batches), and the short forms its postfix uses.

``progress`` is True (a bar), False (none: ``--quiet``) or None (a bar only when stderr is a terminal, tqdm's
own rule; the CLI's default, so logs of a redirected or CI run hold no carriage-return bar lines). Bars go
to stderr, so stdout keeps only a command's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tqdm.auto import tqdm

Progress = bool | None


def bar(total: int, desc: str, unit: str, progress: Progress, *, initial: int = 0, leave: bool = True) -> tqdm:
    """A tqdm bar on stderr; ``progress`` as in the module doc."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                disable=None if progress is None else not progress)


def short_bytes(count: float) -> str:
    """1536 -> "1.5KB", 2.5e9 -> "2.5GB" (decimal units, as the README's tables)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1000
    return f"{count:.1f}TB"


def postfix(loss: float | None, last_eval: Mapping[str, float] | None, total_bytes: int | None = None) -> dict[str, Any]:
    """A bar's postfix: the current train loss, the last evaluation's metrics (``eval/<name>``) and, for
    federated runs, the cumulative bytes up + down."""
    shown: dict[str, Any] = {"loss": "-" if loss is None else f"{loss:.4f}"}
    shown.update({f"eval/{name}": f"{value:.4f}" for name, value in (last_eval or {}).items()
                  if isinstance(value, (int, float))})
    if total_bytes is not None:
        shown["bytes"] = short_bytes(total_bytes)
    return shown
