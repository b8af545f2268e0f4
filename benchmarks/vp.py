"""Meerkat-vp on the embedded model: the GradIP phenomenon, detection precision/recall, and final accuracy of
Meerkat, Meerkat-vp and random early stopping (same rounds), per seed, on SST-2 and AG News.

Setting (defaults, all overridable with ``--set key=value``): SmolLM2-135M (embedded), sensitive mask at
density 1e-3, a mixture partition of 6 clients (2 single-label "extreme" clients + 4 IID clients), every
client sampled every round, T = 5 local steps, 8 rounds, batch 4 x 40 tokens, lr 1e-3. Meerkat-vp calibrates
on each client's first 25 steps (5 rounds), early window steps [0, 5), late window [15, 25), then stops
flagged clients (one local step per round). Random stopping stops as many clients, drawn at random.

The three methods are identical until the first check (no client can stop earlier), so each (task, seed)
runs that prefix once, as a meerkat_vp run stopped after ``calibration_steps // T`` rounds, and continues a
copy of it as each method (resume from the prefix's checkpoint; the strategy state is the same). Every run's
summary is cached under the results folder and finished runs are skipped, so an interrupted script resumes.
Meerkat-vp is compared with Meerkat and with random stopping paired by seed (a seed fixes the data, the
partition and the shared prefix), by the paper grid's rule: the difference ± its standard error and the
smallest difference the design could detect.

The plain Meerkat run logs GradIP: its trajectories are plotted per (task, seed) under the results folder,
coloured by true client type, with the detection table. ``--quick`` runs the same pipeline on the tiny
random model (seconds; it proves the script, its numbers mean nothing).

    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/vp.py --json benchmarks/results/vp.json
    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/vp.py --quick
    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/vp.py --profile drift \
        --json benchmarks/results/vp_drift.json   # issue 17: calibration on one 50-step round (``DRIFT``)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from paper_grid import DRIFT_EVAL_SIZE  # the whole test split, as in claim 2d
from paper_report import mean_std, paired_verdict

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.report import detection_table, gradip_analysis, plot_gradip
from meerkat_fl.rundir import FINAL, ZERO_SHOT, RunDir, json_safe, primary_metric, read_metric
from meerkat_fl.vp import precision_recall

REPO = Path(__file__).resolve().parent.parent
TASKS = ("sst2", "ag_news")
SEEDS = (0, 1, 2)
METHODS = {
    "meerkat": ["fed.strategy=meerkat"],
    "meerkat_vp": ["fed.strategy=meerkat_vp", "vp.control=detect"],
    "random_stop": ["fed.strategy=meerkat_vp", "vp.control=random"],
}
# [choice] A mixture of 2 single-label clients and 4 IID ones (on binary SST-2, Dirichlet(0.5) clients are
# themselves 75-99% one label, so IID is the clear contrast), all sampled every round, T=5, 8 rounds; batch
# 4 x 40 tokens and lr 1e-3 so that clients move in the few steps a 2-core CPU affords. Calibration on each
# client's first 25 steps: the method doc's 100-step windows scaled by 1/4 (early [0, 5), late [15, 25)); its
# 5x decay cannot be expected in 25 steps, so the thresholds are 2x decay with half the late steps quiet
# (< 0.25 x the early mean), the same shape scaled down.
FULL = [
    "model.source=smollm2", "task.train_size=1200", "task.eval_size=200", "task.max_length=40",
    "task.eval_batch_size=50", "mask.kind=sensitive", "mask.density=1e-3", "zo.lr=1e-3", "zo.eps=1e-3",
    "zo.batch_size=4", "fed.num_clients=6", "fed.partition=mixture", "fed.num_extreme=2",
    "fed.mixture_rest=iid", "fed.alpha=0.5", "fed.local_steps=5", "fed.rounds=8",
    "vp.calibration_steps=25", "vp.early_window=[0, 5]", "vp.late_window=[15, 25]", "vp.quiet_factor=0.25",
    "vp.rho_later=2.0", "vp.rho_quiet=0.5", "vp.recheck_every=1", "run.eval_every=0", "run.checkpoint_every=1",
    # as every cached run was made: the paper's plain aggregation (the robust clip, now the default, came later;
    # the drift runs of 2026-12-03 ran under it and it clipped no scalar) and the generator they drew
    "fed.clip='none'", "zo.noise_generator='torch_cpu'", "zo.noise='gaussian'",
]
QUICK = [  # the same pipeline on the tiny random Llama: seconds, not minutes
    "model.source=tiny", "task.train_size=400", "task.eval_size=32", "zo.lr=1e-2", "zo.batch_size=4",
    "mask.density=0.01", "mask.calibration_sequences=4", "mask.calibration_seq_len=32",
    "fed.num_clients=4", "fed.rounds=3", "fed.local_steps=2", "vp.calibration_steps=4",
    "vp.early_window=[0, 1]", "vp.late_window=[2, 4]", "vp.rho_later=1.0", "vp.rho_quiet=0.0",
]
# Issue 17, item 4: ``--profile drift``, Meerkat-vp where the phenomenon appears. Claim 2d's T = 50 cells show it
# within a round: over 50 consecutive local steps at lr 5e-4, batch 8 x 48 (the drift cells' step), one-label
# clients' |GradIP| fell 2-12x in 9 of 10 rounds and IID clients' 0.3-1.7x (seed 0, results/paper/tables.md,
# "Claim 2d"; in round 1 alone, one-label 2.1-9.3x against IID 0.8-1.7x: separated, but near the 2x threshold).
# [choice] So each client calibrates on its first round of T = 50 steps, with the paper's 100-step windows
# halved (early [0, 10), late [25, 50)) and FULL's thresholds, then 2 more rounds; accuracy on the whole test
# split (SST-2 dev 872, AG News a seeded 1,000, as in claim 2d).
DRIFT = ["task.train_size=2000", "task.max_length=48", "zo.batch_size=8", "zo.lr=5e-4", "fed.local_steps=50",
         "fed.rounds=3", "vp.calibration_steps=50", "vp.early_window=[0, 10]", "vp.late_window=[25, 50]"]
PROFILES = {"short": [], "drift": DRIFT}
# --quick --profile drift: calibration is still exactly the first round, as in DRIFT
QUICK_DRIFT = ["fed.local_steps=4", "vp.calibration_steps=4", "vp.early_window=[0, 1]", "vp.late_window=[2, 4]"]
# SmolLM2 two forwards, batch 4 x 40 / 8 x 48, 2 CPU cores (the printed estimate; evaluations not counted:
# about 36 s per 872-row evaluation, 4 per (task, seed) with --profile drift). drift: SST-2 seed 2's rounds took
# 2,077 s for 1,904 local steps (the step alone is 0.95 s; the rest is the server's replay and GradIP); with its
# 4 evaluations and model loads that cell took about 40 minutes
SECONDS_PER_STEP = {"short": 0.8, "drift": 1.1}


def cell_config(task: str, seed: int, quick: bool, overrides: list[str], profile: str = "short"):
    extra = [*PROFILES[profile], *([f"task.eval_size={DRIFT_EVAL_SIZE[task]}"] if profile == "drift" else [])]
    quick_extra = [*QUICK, *(QUICK_DRIFT if profile == "drift" else [])] if quick else []
    cfg = config.load(None, [*FULL, *extra, *quick_extra, f"task.name={task}", f"run.seed={seed}", *overrides])
    return config.resolve_environment(cfg)


def estimated_steps(cfg) -> int:
    """Local steps of one cell: the shared prefix, then 3 continuations (stopping counted as if perfect)."""
    clients, steps, rounds = cfg.fed.num_clients, cfg.fed.local_steps, cfg.fed.rounds
    prefix = cfg.vp.calibration_steps // steps
    stopped_round = (clients - cfg.fed.num_extreme) * steps + cfg.fed.num_extreme
    return prefix * clients * steps + (rounds - prefix) * (clients * steps + 2 * stopped_round)


def prefix_run(cfg, folder: Path) -> tuple[Path, int]:
    """The shared rounds before the first check, as a meerkat_vp run stopped there (resumable)."""
    rounds = cfg.vp.calibration_steps // cfg.fed.local_steps
    prefix = folder / "prefix"
    vp_cfg = config.validate(config.apply_overrides(cfg, METHODS["meerkat_vp"]))
    done = prefix / "prefix.done"
    if not done.exists():
        resume = RunDir(prefix).has_checkpoint()
        simulate(vp_cfg, prefix, resume=resume, progress=False, stop_after=rounds)
        done.write_text(f"{rounds}\n")
    return prefix, rounds


def run_method(cfg, method: str, folder: Path, prefix: Path) -> dict[str, Any]:
    """Continue a copy of the prefix as ``method`` to the last round; returns its summary."""
    out = folder / method
    method_cfg = config.validate(config.apply_overrides(cfg, METHODS[method]))
    if not RunDir(out).has_checkpoint():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(prefix, out, ignore=shutil.ignore_patterns("prefix.done", "gradip.png"))
        RunDir.create(out, method_cfg)  # this method's resolved config replaces the prefix's
    # the prefix's checkpoint continues as this method: only its method keys may differ from the prefix's, and
    # the clip rule where the prefix's never changed a scalar (its bits are then those of fed.clip='none')
    allowed = ("fed.strategy", "vp.control", *(("fed.clip",) if never_clipped(prefix) else ()))
    return simulate(method_cfg, out, resume=True, progress=False, allow_changed=allowed)


def never_clipped(run: Path) -> bool:
    """True when no round of ``run`` scaled a scalar or rejected a reply. The drift prefixes of 2026-12-03 ran
    under the default norm clip before FULL pinned fed.clip='none'; it never triggered in them, so they are
    the same bits as unclipped prefixes and continue as such."""
    rows = RunDir(run).read_metrics()
    return all(not any(r.get("clipped_by_client", {}).values()) and not r.get("rejected") for r in rows)


def run_record(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from one finished run: accuracy, detection, stops, local steps run."""
    analysis = gradip_analysis(out)
    rows = RunDir(out).read_metrics()
    extreme = [c["client_id"] for c in analysis["clients"] if c["kind"] == "extreme"]
    first = next((r for r in rows if "vp_signals" in r), None)
    detected_first = sorted(int(c) for c in (first or {}).get("vp_detected", []))
    detected_final = rows[-1].get("vp_detected", [])
    return {
        "final_eval_accuracy": read_metric(summary, FINAL, primary_metric(summary)),
        "zero_shot_accuracy": read_metric(summary, ZERO_SHOT, primary_metric(summary)),
        "local_steps_run": int(sum(c["steps"] for c in analysis["clients"])),
        "extreme_clients": extreme,
        "detected_first_check": detected_first,
        "detected_final": detected_final,
        "stopped_final": rows[-1].get("vp_stopped", []),
        "precision_recall_first_check": precision_recall(detected_first, extreme),
        "precision_recall_final": precision_recall(detected_final, extreme),
        "signals_first_check": (first or {}).get("vp_signals", {}),
        "wall_seconds": summary["wall_seconds"],
    }


def run_cell(task: str, seed: int, args, results: Path, runs: Path) -> dict[str, dict[str, Any]]:
    cfg = cell_config(task, seed, args.quick, args.set or [], args.profile)
    folder = runs / f"{task}-seed{seed}"
    records: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        cache = results / f"{task}-seed{seed}-{method}.json"
        if cache.exists():
            records[method] = json.loads(cache.read_text())
            continue
        prefix, _ = prefix_run(cfg, folder)
        tic = time.perf_counter()
        summary = run_method(cfg, method, folder, prefix)
        records[method] = run_record(folder / method, summary)
        cache.write_text(json.dumps(json_safe(records[method]), indent=2) + "\n")
        print(f"  {task} seed {seed} {method}: acc {records[method]['final_eval_accuracy']:.3f} "
              f"({time.perf_counter() - tic:.0f} s)", flush=True)
    plot = results / f"gradip-{task}-seed{seed}.png"
    if not plot.exists() and (folder / "meerkat").exists():
        analysis = gradip_analysis(folder / "meerkat")
        plot_gradip(analysis, plot, title=f"{task}, seed {seed}: |GradIP| per client (plain Meerkat)")
        (results / f"gradip-{task}-seed{seed}.md").write_text(detection_table(analysis) + "\n")
    return records


def finite_mean_std(values: list[float | None]) -> tuple[float, float]:
    """The paper grid's mean and standard deviation over the seeds that have a number: None or NaN is a seed
    with nothing to average (precision when nothing was flagged, recall with no one-label client), not a zero."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return mean_std(finite) if finite else (math.nan, math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="output JSON (default: <results>/vp.json, vp_drift.json with --profile drift)")
    parser.add_argument("--quick", action="store_true", help="tiny random model: proves the pipeline in seconds")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting of every run")
    parser.add_argument("--profile", choices=list(PROFILES), default="short",
                        help="short: 25-step calibration (vp.json); drift: one 50-step round (vp_drift.json)")
    parser.add_argument("--results", type=Path, help="cache, plots (default benchmarks/results/vp[_drift][_quick])")
    parser.add_argument("--runs", type=Path, help="run folders (default runs/vp[_drift][_quick])")
    args = parser.parse_args()
    name = ("vp" if args.profile == "short" else f"vp_{args.profile}") + ("_quick" if args.quick else "")
    results = args.results or REPO / "benchmarks" / "results" / name
    runs = args.runs or REPO / "runs" / name
    results.mkdir(parents=True, exist_ok=True)
    cfg = cell_config(args.tasks[0], args.seeds[0], args.quick, args.set or [], args.profile)
    cells = len(args.tasks) * len(args.seeds)
    steps, pace = estimated_steps(cfg) * cells, SECONDS_PER_STEP[args.profile]
    print(f"{cells} cells x 3 methods, ~{steps} local steps in all"
          + ("" if args.quick else f" (~{steps * pace / 60:.0f} min at {pace} s/step)"), flush=True)

    per_seed: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for task in args.tasks:
        for seed in args.seeds:
            per_seed.setdefault(task, {})[str(seed)] = run_cell(task, seed, args, results, runs)

    out: dict[str, Any] = {
        "benchmark": "vp", "profile": args.profile, "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": config.flatten(cfg) | {"task.name": list(args.tasks), "run.seed": list(args.seeds)},
        "precision": {}, "recall": {}, "acc_meerkat": {}, "acc_meerkat_vp": {}, "acc_random_stop": {},
        "local_steps": {}, "runs": per_seed,
    }
    lines = ["| task | meerkat acc | meerkat_vp acc | random_stop acc | precision | recall | steps m / vp / rs |",
             "|---|---|---|---|---|---|---|"]
    for task, seeds in per_seed.items():
        vp = {s: r["meerkat_vp"] for s, r in seeds.items()}
        out["precision"][task] = {s: r["precision_recall_first_check"][0] for s, r in vp.items()}
        out["recall"][task] = {s: r["precision_recall_first_check"][1] for s, r in vp.items()}
        for method in METHODS:
            out[f"acc_{method}"][task] = {s: r[method]["final_eval_accuracy"] for s, r in seeds.items()}
        out["local_steps"][task] = {m: {s: r[m]["local_steps_run"] for s, r in seeds.items()} for m in METHODS}
        cell = lambda d: "{:.3f} ± {:.3f}".format(*finite_mean_std(list(d.values())))
        steps_cell = " / ".join(f"{statistics.mean(out['local_steps'][task][m].values()):.0f}" for m in METHODS)
        lines.append(f"| {task} | {cell(out['acc_meerkat'][task])} | {cell(out['acc_meerkat_vp'][task])} "
                     f"| {cell(out['acc_random_stop'][task])} | {cell(out['precision'][task])} "
                     f"| {cell(out['recall'][task])} | {steps_cell} |")
    # Meerkat-vp against each reference, paired by seed (a seed fixes the data, partition and shared prefix of
    # all three methods), with the detectable difference, by paper.py's rule
    lines += ["", "| task | meerkat_vp - meerkat | meerkat_vp - random_stop |", "|---|---|---|"]
    out["paired"] = {}
    for task in per_seed:
        by = {m: {int(s): a for s, a in out[f"acc_{m}"][task].items() if a is not None and not math.isnan(a)}
              for m in METHODS}
        out["paired"][task] = {ref: paired_verdict(by["meerkat_vp"], by[ref]) for ref in ("meerkat", "random_stop")}
        lines.append(f"| {task} | {out['paired'][task]['meerkat']} | {out['paired'][task]['random_stop']} |")
    table = "\n".join(lines)
    out["table"] = table
    path = args.json or results / ("vp.json" if args.profile == "short" else f"vp_{args.profile}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(out), indent=2, default=str) + "\n")
    print(table)
    print(f"accuracy: mean ± std over seeds {args.seeds}, differences: mean per-seed difference ± its standard "
          f"error (paired by seed) with the detectable difference; precision/recall of the first check (NaN when nothing flagged "
          f"is left out of the mean); plots and per-seed detection tables in {results}; JSON {path}")


if __name__ == "__main__":
    main()
