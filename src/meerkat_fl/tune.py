"""Hyper-parameter sweeps: each grid point is a normal run, scored on a validation split held out of the training
data (never the test split); the best point's config is written out. A sweep folder resumes: finished points are
skipped and a killed point continues from its checkpoint.

    sweep/base.toml          the config the sweep started from (as given, with its own eval split)
    sweep/grid.json          {"zo.lr": [...], ...}: the values of every swept key
    sweep/points/<name>/     one run folder per point (`name` is its overrides, e.g. "zo.lr=0.0005")
    sweep/tune.json, tune.md the scores; best.toml: base.toml with the best point's overrides

The pieces are public so the paper grid (benchmarks/paper_grid.py, paper_cells.py), which caches its points as
cells shared between worker processes instead of sweep folders, tunes with the same code: ``scale_grid`` builds
the grid around a centre, ``VALIDATION`` is where a point is scored, ``run_score`` reads a run's score and
``best_index`` chooses the best point under a tie rule.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meerkat_fl import config
from meerkat_fl.config import Config
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.progress import Progress, bar
from meerkat_fl.rundir import FINAL, ZERO_SHOT, RunDir, primary_metric, read_metric

log = logging.getLogger(__name__)

# [choice] x{1/4, 1/2, 1, 2, 4} around the centre: the paper grid (BENCHMARKS.md) found a method's stable lr
# within a factor of a few of its preset, and that lr shrinks with density, so the centre is what moves.
DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MAX_POINTS = 1000  # [choice] a grid's points, each a whole run: a bound on a typo, not on a real sweep
# A point's score: its run's primary metric (e.g. accuracy) at the end, on the validation split held out of the
# training data, which every point is forced onto.
VALIDATION: dict[str, Any] = {"task.eval_split": "validation"}
# How ties between equal best scores are broken: "first" in grid order (`meerkat tune`), or the "smallest" point
# (its values compared in key order: the smallest lr; the paper grid's rule, the same on an ascending grid).
TIES = ("first", "smallest")
Runner = Callable[..., dict[str, Any]]  # simulate / finetune: (cfg, out, *, resume, progress) -> summary


def default_center(cfg: Config) -> dict[str, float]:
    """The grid's centre: the config's own lr when it sets one, else the method's preset for the embedded model
    moved to the config's density (``methods.preset_lr``: the stable ZO lr shrinks with the perturbed weights)."""
    from meerkat_fl.config import Config, flatten, method_name
    from meerkat_fl.methods import get_method, preset_lr

    method = get_method(method_name(cfg))
    key = method.lr_key  # zo.lr, or fo.lr for the first-order upper bound
    if flatten(cfg)[key] != flatten(Config())[key]:
        return {key: flatten(cfg)[key]}
    density = 1.0 if cfg.mask.kind in ("dense", "lora") else cfg.mask.density
    return {key: preset_lr(method, density)}


def scale_grid(
    center: Mapping[str, float], factors: Sequence[float] = DEFAULT_FACTORS, significant: int | None = None
) -> dict[str, list[float]]:
    """Each centre value times each factor, e.g. {"zo.lr": [lr/4, lr/2, lr, 2 lr, 4 lr]}; with ``significant``,
    each value rounded to that many significant digits (the paper grid's 3, the digits its cell names keep)."""
    rounded = (lambda value: value) if significant is None else (lambda value: float(f"{value:.{significant}g}"))
    return {key: [rounded(value * factor) for factor in factors] for key, value in center.items()}


def default_grid(
    cfg: Config, factors: Sequence[float] = DEFAULT_FACTORS, center: Callable[[Config], Mapping[str, float]] = default_center
) -> dict[str, list[float]]:
    """The config's centre (``default_center``) times each factor."""
    return scale_grid(center(cfg), factors)


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """["zo.lr=1e-4,2e-4", "zo.eps=1e-3"] -> {"zo.lr": [1e-4, 2e-4], "zo.eps": [1e-3]} (TOML values)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip()
        if not values.strip() or key.count(".") != 1:
            raise ConfigError(f"--grid {item!r}: expected section.key=value,value,... e.g. zo.lr=1e-4,2e-4")
        if key in grid:
            raise ConfigError(f"--grid {item!r}: {key} is given twice")
        grid[key] = [config.parse_override(f"{key}={value}")[1] for value in values.split(",")]
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: Mapping[str, Any]) -> str:
    """A folder name for a point: "zo.lr=0.0005,zo.eps=0.001"."""
    text = ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in point.items())
    return text.replace("/", "_")


def point_config(base: Config, point: Mapping[str, Any]) -> Config:
    """`base` with the point's overrides, evaluated on the validation split held out of the training data."""
    return config.validate(config.apply_overrides(base, {**point, **VALIDATION}))


def run_score(summary: dict[str, Any], task: str | None = None, when: str = FINAL) -> float | None:
    """A run's primary metric at the end (``FINAL``) or before training (``ZERO_SHOT``); None for no summary.
    ``task`` names the metric of old summaries that do not record theirs."""
    return read_metric(summary, when, primary_metric(summary, task)) if summary else None


def best_index(points: Sequence[Mapping[str, Any]], scores: Sequence[float | None], ties: str = "first") -> int:
    """The index of the best-scoring point; a point without a score (None) ranks below every scored one.

    ``ties`` (one of ``TIES``): "first" keeps the first of equal scores in grid order, "smallest" the point whose
    values, compared in key order, are smallest (the smallest lr).
    """
    if ties not in TIES:
        raise ConfigError(f"tune: ties must be one of {', '.join(TIES)}, not {ties!r}")
    if not points or len(points) != len(scores):
        raise ConfigError(f"tune: {len(points)} points and {len(scores)} scores: nothing to choose from")
    ranked = [float("-inf") if value is None else float(value) for value in scores]
    tied = [i for i, value in enumerate(ranked) if value == max(ranked)]
    return tied[0] if ties == "first" else min(tied, key=lambda i: tuple(points[i].values()))


@dataclass
class PointResult:
    point: dict[str, Any]
    folder: Path
    status: str  # "ran" | "resumed" | "done before"
    summary: dict[str, Any]

    @property
    def metric(self) -> str | None:
        return primary_metric(self.summary) if self.summary else None

    def value(self, when: str = FINAL) -> float | None:
        """The primary metric at the end (``FINAL``) or before training (``ZERO_SHOT``)."""
        return run_score(self.summary, when=when)

    @property
    def score(self) -> float:
        value = self.value()
        return float("-inf") if value is None else float(value)


def best_result(results: Sequence[PointResult], ties: str = "first") -> PointResult:
    """The best of the points (``best_index`` on their final validation scores)."""
    return results[best_index([r.point for r in results], [r.value() for r in results], ties)]


def run_point(runner: Runner, cfg: Config, folder: Path, progress: Progress) -> tuple[str, dict[str, Any]]:
    """Run one point into `folder`: skip it when finished, resume it from its checkpoint, else start it afresh."""
    run = RunDir(folder)
    if folder.exists():
        if (folder / "config.toml").exists() and config.load(folder / "config.toml") != cfg:
            raise ConfigError(f"{folder} holds a run of another config; give the sweep a new folder (--out)")
        if (folder / "summary.json").exists():
            return "done before", run.read_json("summary.json")
        if run.has_checkpoint():
            return "resumed", runner(cfg, folder, resume=True, progress=progress)
        shutil.rmtree(folder)  # killed before its first checkpoint: nothing to continue from
    return "ran", runner(cfg, folder, progress=progress)


def tune(
    base: Config, out: str | Path, grid: Mapping[str, Sequence[Any]] | None = None, *, runner: Runner | None = None,
    progress: Progress = True,
) -> list[PointResult]:
    """Run every grid point (default: default_grid(base)) into `out`; write tune.json, tune.md and best.toml.

    A bar over the points shows the one running and the best validation score so far (each run shows its own).

    Returns the points in grid order. The same `out` again skips finished points and resumes a killed one.
    """
    if runner is None:
        from meerkat_fl.fed.simulate import simulate as runner
    out = Path(out)
    grid = {key: list(values) for key, values in (grid or default_grid(base)).items()}
    if not grid or not all(grid.values()):
        raise ConfigError("tune: the grid is empty; give --grid section.key=value,value,...")
    if math.prod(len(values) for values in grid.values()) > MAX_POINTS:
        raise ConfigError(f"tune: the grid has {math.prod(len(v) for v in grid.values())} points, more than the "
                          f"limit {MAX_POINTS} (each point is a whole run)")
    points = grid_points(grid)
    configs = [point_config(base, point) for point in points]  # every point is checked before any runs
    out.mkdir(parents=True, exist_ok=True)
    RunDir(out).write_json("grid.json", grid)
    (out / "base.toml").write_text(config.to_toml(base), encoding="utf-8")
    results = []
    points_bar = bar(len(points), "tune", "point", progress)
    for number, (point, cfg) in enumerate(zip(points, configs, strict=True), start=1):
        folder = out / "points" / point_name(point)
        log.info("tune: point %d of %d, %s", number, len(points), point_name(point))
        points_bar.set_postfix(point=point_name(point))
        status, summary = run_point(runner, cfg, folder, progress)
        results.append(PointResult(point, folder, status, summary))
        leader = best_result(results)
        points_bar.update(1)
        points_bar.set_postfix(best=point_name(leader.point), score=f"{leader.score:.4f}")
    points_bar.close()
    best = best_result(results)  # ties: the first in grid order
    (out / "best.toml").write_text(config.to_toml(config.validate(config.apply_overrides(base, best.point))))
    RunDir(out).write_json("tune.json", {
        "grid": grid, "score": f"final {best.metric} on task.eval_split=validation", "metric": best.metric,
        "best": best.point,
        "points": [{"point": r.point, "folder": str(r.folder), "status": r.status, "score": r.value(),
                    "zero_shot": r.value(ZERO_SHOT), "wall_seconds": r.summary.get("wall_seconds")}
                   for r in results],
    })
    (out / "tune.md").write_text(table(results) + "\n", encoding="utf-8")
    return results


def table(results: Sequence[PointResult]) -> str:
    """A Markdown table of the points: overrides, the validation primary metric (zero-shot, final), status; best
    marked."""
    best = best_result(results)
    keys = list(results[0].point)
    fmt = lambda value: "-" if value is None else f"{value:.4f}"
    lines = ["| " + " | ".join([*keys, "val. zero-shot", f"val. {best.metric}", "status", ""]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for result in results:
        values = [f"{v:g}" if isinstance(v, float) else str(v) for v in result.point.values()]
        lines.append("| " + " | ".join([*values, fmt(result.value(ZERO_SHOT)),
                                        fmt(result.value()), result.status,
                                        "best" if result is best else ""]) + " |")
    return "\n".join(lines)


def load_sweep(out: str | Path) -> tuple[Config, dict[str, list[Any]]]:
    """The base config and grid a sweep folder was started with (to resume it)."""
    out = Path(out)
    if not (out / "base.toml").is_file() or not (out / "grid.json").is_file():
        raise ConfigError(f"{out} is not a sweep folder (no base.toml and grid.json)")
    grid = RunDir(out).read_json("grid.json")
    if not all(isinstance(values, list) for values in grid.values()):
        raise DataError(f"{out / 'grid.json'}: each key must map to a list of values: the file is damaged")
    # Settings that default from the environment resolve as a new sweep's do (as `run --resume` does).
    return config.validate(config.resolve_environment(config.load(out / "base.toml"))), grid
