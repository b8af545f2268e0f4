"""The paper grid's cells: run or read each one, cache its result, share the grid between worker processes.

``collect`` walks the grid of ``paper_grid`` (tuning on validation first, then the claims' test seeds at the
tuned lr, then the checks beyond the grids) and returns the per-(task, method, setting) seed lists that the
report reads. A cell runs once through ``simulate`` and is cached as JSON under the cells folder; ``fetch``
reads that cache or runs the cell, ``tuned_lr`` picks a method's lr from its validation cells (scored and chosen
by ``meerkat_fl.tune``, the library's tuner). Workers
(``work``, started by ``spawn``) share the grid through lock files holding their pid: a live worker's cell is
skipped, a dead worker's taken over, and at most one dense cell runs at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import paper_grid as grid  # settings and paths read as grid.X, so a test patching paper_grid is seen here
from paper_grid import Cell, lr_grid

from meerkat_fl import config, tune
from meerkat_fl.environment import device_name
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.rundir import ENVIRONMENT, EVAL, ZERO_SHOT, RunDir, primary_metric, read_metric
from meerkat_fl.tune import run_score as score  # cells written before metrics had names read by their task

ENTRY = Path(__file__).with_name("paper.py")  # the script a worker process runs (with --worker)
HEAVY = ("full_fedzo", "fedmezo")  # dense cells: one at a time (several GB each)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(name: str) -> Path | None:
    """Take lock ``name`` (None when a live process holds it; a dead holder's lock is taken over)."""
    grid.LOCKS.mkdir(parents=True, exist_ok=True)
    path = grid.LOCKS / f"{name}.lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder, age = int(path.read_text() or 0), time.time() - path.stat().st_mtime
            except (OSError, ValueError):
                holder, age = 0, 0.0
            if holder == os.getpid():
                return path
            if (holder and _alive(holder)) or (not holder and age < 30):
                return None  # held by a live worker, or just created and its pid not written yet
            path.unlink(missing_ok=True)  # stale: its worker died
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return path
    return None


class Busy(Exception):
    """The cell is being run by another worker (or waits for the dense slot)."""


def run_cell(cell: Cell) -> dict[str, Any]:
    """The cell's cached result, running it first when it is not cached; Busy when another worker has it."""
    path = grid.CELLS / f"{cell.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    lock = _lock(cell.key)
    if lock is None:
        raise Busy(cell.key)
    heavy = _lock("dense") if cell.method in HEAVY else None
    if cell.method in HEAVY and heavy is None:
        lock.unlink(missing_ok=True)
        raise Busy(cell.key)
    try:
        if path.exists():  # finished by another worker between the check and the lock
            return json.loads(path.read_text())
        return _run(cell, path)
    finally:
        for held in (lock, heavy):
            if held is not None:
                held.unlink(missing_ok=True)


def _run(cell: Cell, path: Path) -> dict[str, Any]:
    cfg = config.validate(config.resolve_environment(config.load(None, cell.overrides())))
    out = grid.RUNS / cell.key
    resume = (out / "checkpoint.safetensors").exists()
    print(f"[{time.strftime('%H:%M:%S')}] {'resume' if resume else 'run'} {cell.key}", flush=True)
    summary = simulate(cfg, out, resume=resume, progress=False, overwrite=not resume)  # a cell cut before its
    # first checkpoint starts again
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    curve, total, metric = [], 0, primary_metric(summary)
    for row in rows:
        total += row["bytes_up"] + row["bytes_down"]
        if read_metric(row, EVAL, metric) is not None:
            curve.append([row["round"], total, read_metric(row, EVAL, metric)])
    result = {"cell": dataclasses.asdict(cell), "summary": summary, "curve": curve,
              "device": device_name(cfg.model.device)}
    devices = ran_on(RunDir(out).read_json(ENVIRONMENT), result["device"])  # a damaged file: a one-line DataError
    if len(devices) > 1:  # resumed on another device: name them all, first to last
        result["devices"] = devices
    if (out / "gradip.jsonl").exists():  # sensitive masks: GradIP of every replayed step (a few KB)
        result["gradip"] = [json.loads(line) for line in (out / "gradip.jsonl").read_text().splitlines() if line]
    grid.CELLS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a cell
    return result


def ran_on(environment: dict[str, Any], last: str) -> list[str]:
    """The devices a run computed on, first to last without repeats: its environment record's earlier starts
    (RunDir.record_environment keeps them) and ``last``, the device that finished it."""
    earlier = environment.get("earlier", []) if isinstance(environment, dict) else []
    names = [entry["device_name"] for entry in earlier if isinstance(entry, dict) and "device_name" in entry]
    return list(dict.fromkeys([*names, last]))


def cached(cell: Cell) -> dict[str, Any] | None:
    path = grid.CELLS / f"{cell.key}.json"
    return json.loads(path.read_text()) if path.exists() else None


# A worker runs one cell per pass over the grid, then starts again from the top, so a task whose lr another
# worker was still tuning is taken up again before any later task's cells (claims finish task by task).
WORKER_PASS = {"one_cell": False, "ran": False}


def fetch(cell: Cell, run: bool, pending: list[str]) -> dict[str, Any] | None:
    """The cell's result: run it when ``run`` (and no other worker has it); None (noted in pending) otherwise."""
    if WORKER_PASS["one_cell"] and WORKER_PASS["ran"]:
        run = False
    try:
        fresh = run and not (grid.CELLS / f"{cell.key}.json").exists()  # no JSON read twice
        result = run_cell(cell) if run else cached(cell)
        WORKER_PASS["ran"] |= fresh and WORKER_PASS["one_cell"]
    except Busy:
        result = None
    if result is None:
        pending.append(cell.key)
    return result


def tuned_lr(task: str, method: str, run: bool, pending: list[str]) -> float | None:
    """The lr with the best validation accuracy (ties: grid.LR_TIES, the smaller lr), chosen by the library's
    tuner; None while the grid is unfinished."""
    source = grid.METHODS[method][2] or method
    lrs = lr_grid(source)
    results = [fetch(Cell(task, source, "base", lr, 0, "validation"), run, pending) for lr in lrs]
    if any(result is None for result in results):
        return None
    scores = [score(result["summary"], task) for result in results]
    return lrs[tune.best_index([{"zo.lr": lr} for lr in lrs], scores, ties=grid.LR_TIES)]


def collect(tasks, claims, seeds, run: bool) -> dict[str, Any]:
    """Run (or read) every cell of the claims; the per-(task, method, setting) seed lists.

    ``pending`` lists the cells still missing: held by other workers, or waiting for a tuned lr.
    """
    lrs: dict[str, dict[str, float | None]] = defaultdict(dict)
    results: dict[str, dict[str, Any]] = {}
    pending: list[str] = []
    eps: dict[str, dict[str, float | None]] = {}  # epsilon is fixed in BASE; this checks Meerkat's sensitivity
    for task in tasks:  # a task's claims in the order given, then the next task: whole tasks finish first
        for claim in claims:
            if claim not in grid.TASK_CLAIMS.get(task, claims):
                continue
            methods, settings, _ = grid.CLAIMS[claim]
            for method in methods:
                if method not in lrs[task]:
                    lrs[task][method] = tuned_lr(task, method, run, pending)
                lr = lrs[task][method]
                for setting in settings:
                    key = f"{task}/{method}/{setting}"
                    if lr is None:
                        pending.append(f"{key} (lr not tuned yet)")
                        continue
                    if key in results:
                        continue
                    cells = [Cell(task, method, setting, lr, seed, "test") for seed in seeds]
                    done = [r for r in (fetch(c, run, pending) for c in cells) if r is not None]
                    if done:
                        results[key] = {
                            "task": task, "method": method, "setting": setting, "lr": lr,
                            "seeds": [r["cell"]["seed"] for r in done],
                            "zero_shot": [score(r["summary"], task, ZERO_SHOT) for r in done],
                            "accuracy": [score(r["summary"], task) for r in done],
                            "bytes_per_round": statistics.fmean(
                                r["summary"]["bytes_up_per_round"] + r["summary"]["bytes_down_per_round"] for r in done),
                            "wall_seconds": [r["summary"]["wall_seconds"] for r in done],
                            "curves": [r["curve"] for r in done],
                        }
        lr = lrs[task].get("meerkat")
        if lr is not None and "1" in claims and "1" in grid.TASK_CLAIMS.get(task, claims):
            tuned = cached(Cell(task, "meerkat", "base", lr, 0, "validation"))
            eps[task] = {"lr": lr, "1e-3": score(tuned["summary"], task) if tuned else None}
            for value, setting in grid.EPS_CHECK.items():
                result = fetch(Cell(task, "meerkat", setting, lr, 0, "validation"), run, pending)
                eps[task][value] = score(result["summary"], task) if result else None
            dense = fetch(Cell(task, "full_fedzo", "base", grid.DENSE_CHECK_LR, 0, "validation"), run, pending)
            eps[task]["full_fedzo_above_grid"] = score(dense["summary"], task) if dense else None
    tuning: dict[str, Any] = {}
    for task in tasks:
        tuned = {grid.METHODS[m][2] or m for claim in claims if claim in grid.TASK_CLAIMS.get(task, claims)
                 for m in grid.CLAIMS[claim][0]}  # the methods with an lr grid
        tuning[task] = {m: {str(lr): score((cached(Cell(task, m, "base", lr, 0, "validation")) or {}).get(
            "summary", {}), task) for lr in lr_grid(m)} for m in grid.METHODS if m in tuned}
    return {"lrs": lrs, "results": results, "tuning_grid": tuning, "eps_check": eps, "pending": sorted(set(pending))}


def work(tasks, claims, seeds) -> None:
    """One worker: run free cells, one per pass, until every cell is cached; wait while others hold the rest."""
    WORKER_PASS["one_cell"] = True
    while True:
        WORKER_PASS["ran"] = False
        pending = collect(tasks, claims, seeds, run=True)["pending"]
        if not pending:
            return
        if not WORKER_PASS["ran"]:  # nothing free for us: the rest is held elsewhere
            time.sleep(20)


def spawn(args: argparse.Namespace) -> None:
    """Run ``args.workers`` worker processes, splitting the cores between them, and wait for all."""
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    LOGS = grid.RUNS / "logs"
    LOGS.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ENTRY), "--worker", "--tasks", *args.tasks, "--claims", *args.claims,
            "--seeds", *map(str, args.seeds)]
    procs = []
    for i in range(args.workers):
        log = (LOGS / f"worker{i}.log").open("a")
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(5)  # stagger: the workers start on different cells
    print(f"{args.workers} workers at {threads} torch thread(s) each; logs in {LOGS.relative_to(grid.REPO)}", flush=True)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); see {LOGS.relative_to(grid.REPO)}")
