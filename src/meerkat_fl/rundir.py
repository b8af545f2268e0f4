"""The run folder: resolved config, metrics.jsonl, summary.json, checkpoints, the final patch.

Every write is atomic (temp file, then rename), so a run killed at any instant (kill -9 included) leaves
a folder it can resume from: the checkpoint says which round it holds, and metrics after it are dropped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meerkat_fl.config import Config, to_toml
from meerkat_fl.environment import environment
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tensorboard_log import FOLDER as TENSORBOARD
from meerkat_fl.tensorboard_log import TensorBoardLog

CHECKPOINT = "checkpoint.safetensors"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"

# Metrics are logged by the names the task's evaluate() gives them, under a prefix saying when they were
# taken: "eval/<name>" in metrics.jsonl, "zero_shot/<name>" and "final/<name>" in summary.json, whose
# "primary_metric" names the one plots and tables show.
EVAL, ZERO_SHOT, FINAL = "eval", "zero_shot", "final"
# Run folders written before metrics had names (and the paper cache) hold one metric under these keys.
_LEGACY = {EVAL: "eval_{}", ZERO_SHOT: "zero_shot_{}", FINAL: "final_eval_{}"}


def prefixed(prefix: str, metrics: dict[str, float] | None) -> dict[str, float]:
    """``{"accuracy": a}`` -> ``{"<prefix>/accuracy": a}``; None -> {}."""
    return {f"{prefix}/{name}": value for name, value in (metrics or {}).items()}


def unprefixed(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """The metrics stored under ``<prefix>/`` in a record, by bare name."""
    head = prefix + "/"
    return {key[len(head):]: value for key, value in record.items() if key.startswith(head)}


def read_metric(record: dict[str, Any], prefix: str, name: str) -> float | None:
    """``record["<prefix>/<name>"]``, or the pre-naming key of old run folders (e.g. ``final_eval_accuracy``)."""
    key = f"{prefix}/{name}"
    return record[key] if key in record else record.get(_LEGACY[prefix].format(name))


def primary_metric(summary: dict[str, Any], task: str | None = None) -> str:
    """The metric a run's plots show: its summary's ``primary_metric``, else that of its task (by name)."""
    if "primary_metric" in summary:
        return summary["primary_metric"]
    from meerkat_fl.tasks import get_task  # old run folders: ask the task

    name = task or summary.get("task")
    if name is None:
        raise ConfigError("cannot tell which metric to show: the summary names no primary_metric and no task")
    return get_task(name).primary_metric


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def json_safe(value: Any) -> Any:
    """NaN/inf become null so metrics stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# The fields readers compute with (resume compares rounds, plots add bytes and draw metrics): a line where one
# has another type is damaged, and says so here rather than as a TypeError in the reader.
_COUNTERS = ("round", "step", "bytes_up", "bytes_down")


def _check_row(row: dict[str, Any], where: str) -> None:
    for key in _COUNTERS:
        if key in row and (type(row[key]) is not int or row[key] < 0):
            raise DataError(f"{where}: {key} must be an integer >= 0, got {row[key]!r}; the file is damaged")
    for key, value in row.items():
        if key.startswith(EVAL + "/") and value is not None and type(value) not in (int, float):
            raise DataError(f"{where}: {key} must be a number, got {value!r}; the file is damaged")


class RunDir:
    """One run's folder. ``tensorboard``: metrics.jsonl is mirrored into ``tensorboard/`` once
    ``start_tensorboard`` is called (the run shell does, after aligning metrics.jsonl with the checkpoint)."""

    def __init__(self, path: str | Path, tensorboard: bool = False):
        self.path = Path(path)
        self.tensorboard = tensorboard
        self._board: TensorBoardLog | None = None

    @classmethod
    def create(cls, path: str | Path, cfg: Config) -> RunDir:
        run = cls(path, tensorboard=cfg.run.tensorboard)
        run.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(run.path / "config.toml", to_toml(cfg).encode())
        run.record_environment(cfg.model.device, cfg.model.dtype)
        return run

    def record_environment(self, device: str, dtype: str) -> dict[str, Any]:
        """Write environment.json (versions, device, dtype, threads) and return the record. The records of
        earlier starts that differ from this one (a run resumed on another device, torch or thread count) stay
        in it under ``"earlier"``, oldest first, so the folder names every environment the run computed in."""
        record = environment(device, dtype)
        earlier = self._earlier_environments(record)
        if earlier:
            record["earlier"] = earlier
        self.write_json(ENVIRONMENT, record)
        return record

    def _earlier_environments(self, current: dict[str, Any]) -> list[Any]:
        """The environments this folder's run started in before, plus the last record when it differs from
        ``current``. A damaged environment.json becomes one ``{"unreadable": ...}`` entry: it is only a record,
        and a resume must not fail on it."""
        if not (self.path / ENVIRONMENT).exists():
            return []
        try:
            previous = self.read_json(ENVIRONMENT)
        except DataError as exc:
            return [{"unreadable": str(exc)}]
        earlier = previous.pop("earlier", [])
        earlier = earlier if isinstance(earlier, list) else [{"unreadable": f"'earlier' was {type(earlier).__name__}"}]
        return earlier if previous == current else [*earlier, previous]

    def write_summary(self, summary: dict[str, Any], device: str, dtype: str) -> None:
        """summary.json: `summary` plus the environment of the process finishing the run (a resumed run may
        finish elsewhere than it started, so environment.json is rewritten too)."""
        self.write_json("summary.json", {**summary, "environment": self.record_environment(device, dtype)})
        self.close()

    def start_tensorboard(self) -> None:
        """Rebuild ``tensorboard/`` from metrics.jsonl as it stands; later lines are added as they are written."""
        self.close()
        self._board = TensorBoardLog(self.path / TENSORBOARD, self.read_metrics())

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any (the end of a run, or its stopping early)."""
        if self._board is not None:
            self._board.close()
            self._board = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def patch_path(self) -> Path:
        return self.path / "patch.safetensors"

    def append_metrics(self, record: dict[str, Any], name: str = METRICS) -> None:
        with open(self.path / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")
            handle.flush()
        if self._board is not None and name == METRICS:
            self._board.write(json_safe(record))

    def read_metrics(self, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): the file is damaged") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        lines = text.split("\n")
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the unfinished last line of a kill mid-write: not a round that happened
                    break
                raise DataError(f"{path}:{number}: not a JSON metrics line; the file is damaged (resume repairs "
                                "only an unfinished last line)") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a metrics line must be a JSON object")
            _check_row(row, f"{path}:{number}")
            rows.append(row)
        return rows

    def truncate_metrics(self, last_round: int, key: str = "round", name: str = "metrics.jsonl") -> None:
        """Keep only the metric lines up to ``last_round`` (used on resume)."""
        rows = [r for r in self.read_metrics(name) if r.get(key, -1) <= last_round]
        _atomic_write(self.path / name, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write_json(self, name: str, data: Any) -> None:
        _atomic_write(self.path / name, (json.dumps(json_safe(data), indent=2) + "\n").encode())

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON object written by ``write_json``; DataError naming the file when it is damaged."""
        path = self.path / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot be read as JSON ({exc}): the file is damaged") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}: the file is damaged")
        return data

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()} or {"empty": torch.zeros(0)}
        tmp = self.path / (CHECKPOINT + ".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(self.path / CHECKPOINT)

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).exists()

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.path / CHECKPOINT
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                state = json.loads((handle.metadata() or {})["state"])
            return load_file(str(path)), state
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the checkpoint ({exc})") from None
