"""TensorBoard logging of a run's metrics.jsonl (``run.tensorboard = true``; needs the ``tensorboard`` extra).

Every number of a metrics line becomes a scalar at the line's round (federated runs) or step (finetune);
nested dicts become tag paths: ``eval/accuracy``, ``train_loss_by_client/3``. Lists (e.g. the accepted client
ids) and text are not scalars and are left out; a NaN is null in metrics.jsonl and left out here too.
TensorBoard stores float32 (about 7 significant digits: byte counts above 16.7 M are rounded).

metrics.jsonl is the record; this folder is a view of it. So it is rebuilt from metrics.jsonl whenever a run
starts or resumes: a resume, which keeps only the lines up to its checkpoint, never leaves TensorBoard steps of
the rounds it threw away (whatever reader is used: not every one honours ``purge_step``).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from meerkat_fl.errors import ConfigError

FOLDER = "tensorboard"  # inside the run folder
STEP_KEYS = ("round", "step")  # what a metrics line is indexed by


def require() -> None:
    """ConfigError unless the tensorboard package is installed (checked before a run builds anything)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard = true needs the tensorboard package: pip install 'meerkat-fl[tensorboard]'")


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics line by tag (nested dicts joined with "/"), without its step key."""
    found: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in STEP_KEYS:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(scalars(value, tag + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[tag] = float(value)
    return found


def line_step(record: Mapping[str, Any]) -> int | None:
    """The round or step a metrics line is for (None: a line without one)."""
    for key in STEP_KEYS:
        if isinstance(record.get(key), int):
            return int(record[key])
    return None


class TensorBoardLog:
    """An event folder mirroring metrics.jsonl: starts as the given lines, then takes each new one."""

    def __init__(self, folder: str | Path, lines: Iterable[Mapping[str, Any]] = ()):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.writer = SummaryWriter(str(self.folder))
        for line in lines:
            self.write(line, flush=False)
        self.writer.flush()

    def write(self, record: Mapping[str, Any], flush: bool = True) -> None:
        """Log one metrics line (flushed, so a killed run's folder holds every line written before)."""
        step = line_step(record)
        if step is None:
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
