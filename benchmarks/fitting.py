"""Can a single-label party fit its label with Meerkat's mask, and does GradIP then decay? (issue 17, item 2)

One party holds the training rows of a single label of SST-2 (or AG News) and runs centralised ZO steps on
Meerkat's mask (sensitive, WikiText, density 1e-3) at a few learning rates, with the verbalizer loss (the
label words' logits only) and the options loss (MeZO's: each option's mean log-probability over the full
vocabulary, cross-entropy over the options). Per step it records the batch loss, the projected gradient (the
scalar g) and GradIP = g * <(grad f_p)_m, z> against the mask's pre-training gradient, exactly as the server
computes it (``meerkat_fl.vp.path_gradip``). A party has *fitted* its label when the mean loss of its last 20
steps is below ``FIT_LOSS``; GradIP has *decayed* when its mean magnitude over the first 50 steps is at least
``DECAY`` times that over the last 50 (the paper's rho_later, on the same windows shape as Meerkat-vp).

Each cell (task, label, loss, lr) is cached as JSON under ``results/fitting/``; a rerun only computes missing
cells, so the script resumes where it was stopped. ``--report-only`` rebuilds the table and the plot.

    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data python benchmarks/fitting.py --tasks sst2 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from meerkat_fl import config
from meerkat_fl.build import build_model, build_task_data, obtain_trainable
from meerkat_fl.local import DataPointer, local_train, step_seeds
from meerkat_fl.noise import noise_source
from meerkat_fl.report import save_figure
from meerkat_fl.vp import path_gradip
from meerkat_fl.zo import MaskedParams

RESULTS = Path(__file__).parent / "results"
CELLS = RESULTS / "fitting"
FIT_LOSS = 0.1  # [choice] mean batch loss of the last 20 steps; p(label) ~ 0.9 under either loss
DECAY = 3.0  # [choice] early/late mean |GradIP|; Meerkat-vp's default rho_later threshold is of this order
WINDOW = 50  # steps in the early and in the late GradIP window
LRS = {"sst2": (2e-4, 5e-4, 1e-3, 2e-3), "ag_news": (2e-4, 5e-4, 1e-3, 2e-3)}
BASE = ["model.source=smollm2", "mask.kind=sensitive", "mask.density=1e-3", "zo.eps=1e-3", "zo.batch_size=8",
        "task.max_length=48", "task.train_size=4000", "task.eval_size=8", "run.seed=0"]


def cell_name(task: str, label: int, loss: str, lr: float) -> str:
    return f"{task}_label{label}_{loss}_lr{lr:g}"


def run_cell(task: str, label: int, loss: str, lr: float, steps: int) -> dict[str, Any]:
    """``steps`` ZO steps on the rows of one label; per-step loss, scalar and GradIP."""
    cfg = config.validate(config.resolve_environment(config.load(None, [
        *BASE, f"task.name={task}", f"task.loss={loss}", f"zo.lr={lr}"])))
    loaded = build_model(cfg)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    rows = np.flatnonzero(np.asarray(data.train.partition_labels) == label)
    if rows.size == 0:
        raise SystemExit(f"fitting: task {task} has no training rows with label {label}")
    train = data.train.subset(rows)
    mask = obtain_trainable(cfg, loaded)
    noise = noise_source(cfg.zo.noise_generator, cfg.zo.noise)
    params = MaskedParams(loaded.model, mask, cache_noise=False, noise=noise)
    values = params.gather()
    pointer = DataPointer(len(train), seed=cfg.run.seed)
    seeds = step_seeds(cfg.run.seed, 0, label, steps)
    started = time.perf_counter()
    results = local_train(params, values, seeds, lr=lr, eps=cfg.zo.eps, pointer=pointer,
                          batch_size=cfg.zo.batch_size,
                          batch_loss=lambda idx: data.scorer.loss(train.batch(idx, params.device)))
    seconds = time.perf_counter() - started
    scalars = [r.scalar for r in results]
    gradip, _ = path_gradip(mask, seeds, scalars, noise=noise)
    return {"task": task, "label": label, "loss_kind": loss, "lr": lr, "steps": steps, "rows": int(rows.size),
            "loss": [r.loss for r in results], "scalar": scalars, "gradip": gradip.tolist(),
            "skipped": sum(int(r.skipped) for r in results), "seconds": seconds}


def summarise(cell: dict[str, Any]) -> dict[str, Any]:
    loss = np.asarray(cell["loss"], dtype=float)
    magnitude = np.abs(np.asarray(cell["gradip"], dtype=float))
    scalar = np.abs(np.asarray(cell["scalar"], dtype=float))
    first, last = float(np.nanmean(loss[:20])), float(np.nanmean(loss[-20:]))
    early, late = float(magnitude[:WINDOW].mean()), float(magnitude[-WINDOW:].mean())
    ratio = early / late if late > 0 else math.inf
    return {"cell": cell_name(cell["task"], cell["label"], cell["loss_kind"], cell["lr"]),
            "task": cell["task"], "loss_kind": cell["loss_kind"], "lr": cell["lr"], "steps": cell["steps"],
            "first_loss": first, "last_loss": last, "fitted": bool(last < FIT_LOSS),
            "scalar_first": float(scalar[:WINDOW].mean()), "scalar_last": float(scalar[-WINDOW:].mean()),
            "gradip_early_over_late": ratio, "gradip_decayed": bool(ratio >= DECAY),
            "seconds_per_step": cell["seconds"] / cell["steps"]}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| task | loss | lr | loss first 20 -> last 20 | fitted | mean abs g first -> last 50 "
            "| abs GradIP early/late | decayed |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['loss_kind']} | {r['lr']:g} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} "
                     f"| {'yes' if r['fitted'] else 'no'} | {r['scalar_first']:.3g} -> {r['scalar_last']:.3g} "
                     f"| {r['gradip_early_over_late']:.2f} | {'yes' if r['gradip_decayed'] else 'no'} |")
    return "\n".join(lines)


def smooth(values: np.ndarray, width: int = 10) -> np.ndarray:
    if len(values) < width:
        return values
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(cells: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in cells})
    fig, axes = plt.subplots(3, len(tasks), figsize=(6 * len(tasks), 9), squeeze=False, sharex=True)
    lrs = sorted({c["lr"] for c in cells})
    colours = {lr: plt.cm.viridis(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    for col, task in enumerate(tasks):
        for c in (c for c in cells if c["task"] == task):
            style = "-" if c["loss_kind"] == "verbalizer" else "--"
            label = f"{c['loss_kind']} lr {c['lr']:g}"
            for row, key in enumerate(("loss", "scalar", "gradip")):
                series = np.asarray(c[key], dtype=float)
                series = series if key == "loss" else np.abs(series)
                axes[row][col].plot(smooth(series), style, color=colours[c["lr"]], lw=1, label=label)
        axes[0][col].set_title(f"{task}: one party, label {cells[0]['label']}, Meerkat's mask (10-step means)")
        axes[0][col].set_ylabel("batch loss")
        axes[1][col].set_ylabel("|projected gradient g|")
        axes[2][col].set_ylabel("|GradIP|")
        axes[2][col].set_xlabel("ZO step")
        for row in (1, 2):
            axes[row][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"], choices=sorted(LRS))
    parser.add_argument("--losses", nargs="+", default=["verbalizer", "options"])
    parser.add_argument("--lrs", nargs="+", type=float, help="default: the task's grid in LRS")
    parser.add_argument("--label", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    CELLS.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for loss in args.losses:
            for lr in args.lrs or LRS[task]:
                path = CELLS / f"{cell_name(task, args.label, loss, lr)}.json"
                if path.exists() or args.report_only:
                    continue
                print(f"fitting: {path.stem} ({args.steps} steps)", file=sys.stderr, flush=True)
                cell = run_cell(task, args.label, loss, lr, args.steps)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cell))
                tmp.replace(path)  # a killed run leaves no half-written cell
    cells = [json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))]
    if not cells:
        print("fitting: no cells yet", file=sys.stderr)
        return 1
    cells.sort(key=lambda c: (c["task"], c["loss_kind"], c["lr"]))
    rows = [summarise(c) for c in cells]
    text = table(rows)
    print(text)
    (RESULTS / "fitting.json").write_text(json.dumps({"fit_loss": FIT_LOSS, "decay": DECAY, "window": WINDOW,
                                                      "cells": rows}, indent=1))
    (RESULTS / "fitting.md").write_text(text + "\n")
    print(f"plot: {plot(cells, RESULTS / 'fitting.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
