"""The paper's claims on the embedded SmolLM2-135M and real data: a resumable grid of federated runs.

Every cell (task, method, setting, lr, seed, split) is one ``simulate`` run; its result (summary and
accuracy/bytes curve) is cached as JSON under benchmarks/results/paper/cells/, so re-running skips finished
cells and, with every cell cached, only rebuilds the tables and plots (seconds). Run folders go to
runs/paper/ (not committed).

Stages:
1. tune: for each (task, method) an lr grid, seed 0, evaluated on a validation split held out of the
   training data (task.eval_split=validation), never on the test split. The grid is centred on
   LR_CENTRE * (1e-3 / density) (ZO's stable lr shrinks with the number of perturbed weights) times LR_FACTORS
   (METHOD_LR_FACTORS for the baselines whose 3-point grid was flat).
2. claims: the chosen lr per (task, method), >= 3 seeds, evaluated on the test split.

    python benchmarks/paper.py                              # everything (many hours on 2 cores; resumable)
    python benchmarks/paper.py --workers 2                  # two cell processes at one torch thread each
    python benchmarks/paper.py --tasks sst2 --claims 1      # a slice
    python benchmarks/paper.py --report-only                # tables and plots from the cache
    python benchmarks/paper.py --claims 2d --tasks sst2     # an opt-in claim's slice (runs only its cells)

After a run, the tables, plots and results/paper.json cover the whole cache (the default tasks and claims, every
one named, and each opt-in claim with cached cells), so running a slice never drops finished claims from them;
``--report-only`` with --tasks/--claims/--seeds reports just that slice.

Parallel workers share the grid through lock files (runs/paper/locks/<cell>.lock, holding the owner's pid): a
worker skips a cell another live worker holds, takes over a dead worker's lock, waits for cells whose lr
is still being tuned elsewhere, and at most one dense (full-parameter) cell runs at a time, for memory.

The grid is defined in paper_grid.py (settings, methods, claims, lr grids, paths), its cells are run, cached
and shared between workers by paper_cells.py, and the verdicts, tables and plots come from paper_report.py;
this script parses the command line, drives them and writes results/paper.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import paper_cells as cells
import paper_grid as grid
from paper_cells import WORKER_PASS, Busy, _lock, collect, run_cell, spawn, tuned_lr, work
from paper_gradip import auc, drift_gradip, drift_gradip_lines, plot_drift_gradip, plot_gradip
from paper_grid import DENSE_CHECK_LR, Cell, lr_grid
from paper_report import (
    USEFUL_DIFFERENCE,
    bytes_to_beat,
    detectable,
    devices_line,
    paired_difference,
    paired_verdict,
    plot,
    report,
    verdict,
    welch_difference,
)

from meerkat_fl.environment import device_name
from meerkat_fl.models import DEVICE_PATTERN

# what tests/test_paper.py reads from this script (it patches settings, paths and runners on the modules)
__all__ = ["DENSE_CHECK_LR", "USEFUL_DIFFERENCE", "WORKER_PASS", "Busy", "Cell", "_lock", "auc", "bytes_to_beat",
           "cells", "collect", "detectable", "devices_line", "drift_gradip", "drift_gradip_lines", "grid", "lr_grid",
           "main", "paired_difference", "paired_verdict", "report", "run_cell", "tuned_lr", "verdict",
           "welch_difference"]


def report_scope(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    """What the tables cover after a run: the default tasks and claims, every task and claim the command named,
    and each opt-in claim that has cached cells (``--claims 2d --tasks sst2`` must not drop claims 1-6 from
    tables.md), over the default seeds and any named."""
    tasks = [*grid.TASKS, *(t for t in args.tasks or () if t not in grid.TASKS)]
    cached = {p.stem for p in grid.CELLS.glob("*.json")}
    extras = [claim for claim in grid.EXTRA_CLAIMS if claim in grid.CLAIMS
              and (claim in (args.claims or ()) or any(f"-{setting}-lr" in name for setting in grid.CLAIMS[claim][1]
                                                     for name in cached))]
    claims = [*grid.default_claims(), *extras]
    seeds = sorted({*grid.SEEDS, *(args.seeds or ())})
    return tasks, claims, seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=[*grid.TASKS, *grid.EXTRA_TASKS],
                        help=f"default: {' '.join(grid.TASKS)}")
    parser.add_argument("--claims", nargs="+", choices=list(grid.CLAIMS),
                        help=f"default: all but the opt-in {', '.join(grid.EXTRA_CLAIMS)}")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--report-only", action="store_true", help="no runs: tables and plots from the cache")
    parser.add_argument("--workers", type=int, default=1, help="cell processes in parallel (cores split between)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not DEVICE_PATTERN.fullmatch(grid.DEVICE):
        parser.error(f"MEERKAT_PAPER_DEVICE: expected cpu, cuda, cuda:N or mps, got {grid.DEVICE!r}")
    sliced = args.report_only and (args.tasks or args.claims or args.seeds)  # a report of the slice named
    report_tasks, report_claims, report_seeds = report_scope(args)
    args.tasks = args.tasks or list(grid.TASKS)
    args.claims = args.claims or grid.default_claims()
    args.seeds = args.seeds or list(grid.SEEDS)
    if args.worker:
        return work(args.tasks, args.claims, args.seeds)
    started = time.perf_counter()
    if not args.report_only:
        if args.workers > 1:
            spawn(args)
        else:  # the slice's cells; the tables below cover the whole cache, so a slice never drops finished claims
            collect(args.tasks, args.claims, args.seeds, run=True)
    if sliced:
        report_tasks, report_claims, report_seeds = args.tasks, args.claims, args.seeds
    args.tasks = report_tasks  # what paper.json's cell count covers
    data = collect(report_tasks, report_claims, report_seeds, run=False)
    within = drift_gradip(data, report_tasks) if "2d" in report_claims else {}  # claim 2d's GradIP in a round
    text = report(data, report_tasks, sorted(report_claims), within)
    mine = [p for p in grid.CELLS.glob("*.json") if p.stem.split("-")[1] in report_tasks]  # <split>-<task>-...
    results = [json.loads(p.read_text()) for p in mine]
    line = devices_line(results, device_name("cpu"))
    text += f"\n{line}\n" if line else ""
    print(text)
    (grid.RESULTS / "paper").mkdir(parents=True, exist_ok=True)
    (grid.RESULTS / "paper" / "tables.md").write_text(text)
    png = plot(data, args.tasks, grid.RESULTS / "paper" / "accuracy.png")
    gradip_png = plot_gradip(data, args.tasks, grid.RESULTS / "paper" / "gradip.png")
    within_png = plot_drift_gradip(data, within, grid.RESULTS / "paper" / "gradip_drift.png")
    cell_seconds = sum(result["summary"]["wall_seconds"] for result in results)
    payload = {
        **data,
        "claims": {k: v[2] for k, v in grid.CLAIMS.items()},
        "base_setting": grid.BASE,
        "settings": grid.SETTINGS,
        "lr_grid": {m: lr_grid(m) for m in grid.METHODS},
        "cells_cached": len(mine),  # of the reported tasks
        "cells_wall_seconds": cell_seconds,
        "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/paper.py " + " ".join(sys.argv[1:]),
        "plot": str(png.relative_to(grid.REPO)) if png else None,
        "gradip_plot": str(gradip_png.relative_to(grid.REPO)) if gradip_png else None,
        "drift_gradip": within,  # claim 2d: |GradIP| decay within a round, per task, T and partition
        "drift_gradip_plot": str(within_png.relative_to(grid.REPO)) if within_png else None,
    }
    (grid.RESULTS / "paper.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote benchmarks/results/paper.json ({payload['cells_cached']} cells cached, "
          f"{cell_seconds / 3600:.1f} h of runs) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
