"""The one run shell, shared by ``meerkat run`` (the simulator and Flower) and ``meerkat finetune``.

It owns what a run folder promises (it never reports what did not happen):
- a new run goes into a new or empty folder; a folder that already holds a run is refused unless the caller
  resumes it or asks to overwrite it (then the old run's files are removed first);
- a resume without a checkpoint starts clean (no metric lines of the lost rounds stay behind), and one with a
  checkpoint keeps exactly the metric lines up to the checkpoint's round;
- the zero-shot evaluation is written once and read back on resume;
- the final metrics of a summary are the last evaluation recorded in metrics.jsonl, so resuming a finished run
  reports what it reached, not its zero-shot.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meerkat_fl import rundir
from meerkat_fl.config import Config
from meerkat_fl.errors import ConfigError
from meerkat_fl.rundir import CHECKPOINT, RunDir
from meerkat_fl.tensorboard_log import require as require_tensorboard

ZERO_SHOT = "zero_shot.json"
# What a run leaves in its folder: refused as the target of a new run unless overwritten.
RUN_FILES = ("config.toml", "metrics.jsonl", CHECKPOINT, "summary.json", ZERO_SHOT, "patch.safetensors",
             "gradip.jsonl", "partition.json", "partition.txt", "environment.json", "tensorboard")


def resume_config(out: str | Path) -> Config:
    """The config of the run in ``out`` for ``--resume``: its config.toml, with settings that default from the
    environment resolved as a new run's are (``config.resolve_environment``: $MEERKAT_DATA_DIR, the data shipped
    in the package), and validated."""
    from meerkat_fl import config

    path = Path(out)
    if not path.is_dir():
        raise ConfigError(f"--resume {path}: not a run folder ({'a file' if path.exists() else 'no such folder'})")
    if not (path / "config.toml").is_file():
        raise ConfigError(f"--resume {path}: not a run folder (no config.toml)")
    return config.validate(config.resolve_environment(config.load(path / "config.toml")))


def open_run(out: str | Path, cfg: Config, *, resume: bool, overwrite: bool = False) -> RunDir:
    """The run folder to write: an existing run to resume, or a fresh one (``overwrite`` clears an old run)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run folder {path} is a file, not a folder")
    if cfg.run.tensorboard:
        require_tensorboard()  # before a model or a mask is built
    if resume:
        if not (path / "config.toml").is_file():
            raise ConfigError(f"--resume {path}: not a run folder (no config.toml)")
        return RunDir(path, tensorboard=cfg.run.tensorboard)
    found = [name for name in RUN_FILES if (path / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"{path} already holds a run ({', '.join(found[:3])}): resume it with --resume {path}, "
                          f"choose another --out, or pass --overwrite")
    for name in found:
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        return RunDir.create(path, cfg)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {path}: {exc.strerror or exc}") from None


def begin(run: RunDir, *, resumed_round: int | None, evaluate: Callable[[], dict[str, float]] | None,
          step_key: str = "round", logs: tuple[str, ...] = ("metrics.jsonl",),
          zero_shot_from: Path | None = None,
          environment: tuple[str, str] | None = None) -> dict[str, float] | None:
    """Align the logs with the checkpoint and return the zero-shot metrics (evaluated once, then read back).

    ``resumed_round``: the round (or step) the loaded checkpoint holds; None when starting from scratch, which
    also drops metric lines a lost earlier attempt left. ``evaluate`` None: no zero-shot evaluation.
    ``zero_shot_from``: a run folder whose zero-shot evaluation this run shares instead of repeating it (the
    caller vouches that it is the same model, task, test rows and scorer); copied with ``"copied_from"`` naming
    that folder, so the file says it was not evaluated here.
    ``environment``: this process's (device, dtype). A run resumed from its checkpoint records it here, once the
    checkpoint has loaded, so environment.json keeps the earlier starts' records and names every environment
    that computed the run, and a resume that failed before this point names none.
    """
    if resumed_round is not None and environment is not None:
        run.record_environment(*environment)
    for name in logs:
        run.truncate_metrics(-1 if resumed_round is None else resumed_round, key=step_key, name=name)
    if run.tensorboard:  # a view of metrics.jsonl as just truncated: no step past the checkpoint survives
        run.start_tensorboard()
    if resumed_round is not None:  # never re-evaluate: the model now holds trained values
        if not (run.path / ZERO_SHOT).exists():
            return None
        saved = run.read_json(ZERO_SHOT)  # "zero_shot/<name>"; "zero_shot_<name>" in folders from before
        return _metrics(saved, rundir.ZERO_SHOT + "/") or _metrics(saved, "zero_shot_") or None
    if evaluate is not None and zero_shot_from is not None:
        source = RunDir(zero_shot_from)
        saved = source.read_json(ZERO_SHOT) if (source.path / ZERO_SHOT).exists() else {}
        zero_shot = _metrics(saved, rundir.ZERO_SHOT + "/")
        if not zero_shot:
            raise ConfigError(f"{zero_shot_from}: no zero-shot evaluation to share ({ZERO_SHOT} missing or empty)")
        run.write_json(ZERO_SHOT, {**rundir.prefixed(rundir.ZERO_SHOT, zero_shot),
                                   "copied_from": str(source.path)})
        return zero_shot
    zero_shot = evaluate() if evaluate is not None else None
    run.write_json(ZERO_SHOT, rundir.prefixed(rundir.ZERO_SHOT, zero_shot))
    return zero_shot


def final_metrics(rows: list[dict[str, Any]], zero_shot: Mapping[str, float] | None) -> dict[str, float] | None:
    """The last evaluation in the metric lines (the zero-shot when no round was evaluated)."""
    for row in reversed(rows):
        found = _metrics(row, rundir.EVAL + "/")
        if found:
            return found
    return dict(zero_shot) if zero_shot else None


def summary_metrics(
    primary_metric: str, zero_shot: Mapping[str, float] | None, final: Mapping[str, float] | None
) -> dict[str, Any]:
    """A summary's metric keys: ``primary_metric`` (what plots show), ``zero_shot/<name>`` and ``final/<name>``
    (None when not evaluated)."""
    names = sorted(set(zero_shot or {}) | set(final or {}) | {primary_metric})
    out: dict[str, Any] = {"primary_metric": primary_metric}
    for name in names:
        out[f"{rundir.ZERO_SHOT}/{name}"] = (zero_shot or {}).get(name)
    for name in names:
        out[f"{rundir.FINAL}/{name}"] = (final or {}).get(name)
    return out


def _metrics(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and isinstance(v, (int, float))
            and not isinstance(v, bool)}
