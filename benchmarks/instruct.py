"""Federated instruction tuning: the embedded SmolLM2-135M-Instruct on Dolly, 10 clients split by category.

Each cell is one ``simulate`` run (Dolly, Alpaca template, pathological partition: one category per client as
FedMeZO's meta split, 10 clients over 8 categories) with ROUGE-L and the response loss on Dolly's test rows
against zero-shot, bytes up and down per round, wall time and the peak RSS of the rounds (reset once the
federation is built, as benchmarks/federated.py does).

Two phases: ``--lr-factors`` > 1 value tunes each method's lr (its preset times each factor) on a validation
split held out of the training rows (task.eval_split=validation), seed 0, best final ROUGE-L; then every method
runs at its chosen lr on the test rows for each of ``--seeds``. Every cell is a run folder under ``--work``:
a finished cell (summary.json) is read back, an interrupted one resumes from its checkpoint, so the script can be
stopped and rerun. The JSON and a plot of ROUGE-L vs round and vs cumulative bytes go to ``--json``/``--plot``.

The defaults are the committed run, sized to finish on an idle 2-core CPU in about 100 minutes (see
benchmarks/README.md for why): every method of the instruction-tuning issue, 3 rounds of T = 1 on all 10 clients
(30 ZO steps per run), 64 tokens a row, lr tuned over the preset times 1 and 4, 3 seeds. Each method's cells
run in turn (tune, then its seeds), so a run cut short leaves whole methods. The table compares every method with
Meerkat per seed (paired: a seed fixes the partition, the data order and the 16 test rows for every method).
A larger setting, e.g. ``--rounds 20 --local-steps 10 --max-length 128 --eval-size 80``, takes days here.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/instruct.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

from paper_report import detectable, paired_difference

from meerkat_fl import config, memory
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.methods import get_method, preset_lr
from meerkat_fl.report import plot_runs

REPO = Path(__file__).resolve().parent.parent
# The methods of the instruction-tuning issue, cheapest first (a run cut short keeps whole methods).
METHODS = ("meerkat", "lora_fedzo", "fedmezo", "fedavg_fo", "full_fedzo", "fedkseed", "fedkseed_pro")
# A method's own setting where it is not the library's default: FedMeZO's paper runs LoRA (the library's
# fedmezo is dense unless mask.kind says otherwise), at LoRA-FedZO's lr preset. Its cells are named by the label.
OWN_SETTING = {"fedmezo": {"label": "fedmezo_lora", "overrides": ["mask.kind=lora"], "lr_from": "lora_fedzo"}}
SUMMARY_KEYS = ("zero_shot/rouge_l", "final/rouge_l", "zero_shot/loss", "final/loss", "bytes_up_per_round",
                "bytes_down_per_round", "wall_seconds", "peak_rss_mb", "trainable_values")


def base_overrides(args: argparse.Namespace) -> list[str]:
    sampled = [f"fed.sample_count={args.sample_count}"] if args.sample_count else []
    return [
        "model.source=smollm2", "task.name=dolly", f"task.max_length={args.max_length}",
        f"task.max_new_tokens={args.max_new_tokens}", f"task.eval_size={args.eval_size}", "task.eval_batch_size=8",
        f"fed.num_clients={args.clients}", "fed.partition=pathological", "fed.labels_per_client=1",
        f"fed.rounds={args.rounds}", f"fed.local_steps={args.local_steps}", f"zo.batch_size={args.batch_size}",
        f"run.eval_every={args.eval_every or args.rounds}", "run.checkpoint_every=1",
        f"task.data_dir={args.data_dir!r}", *sampled,
    ]


def run_cell(out: Path, overrides: list[str], report_only: bool = False) -> dict | None:
    """The summary of the run in ``out``: read back if finished, resumed if interrupted, else run from scratch
    (``report_only``: None for a cell that has not finished)."""
    if (out / "summary.json").is_file():
        try:
            summary = json.loads((out / "summary.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SystemExit(f"instruct.py: {out / 'summary.json'} is unreadable ({err}); delete that run folder "
                             "to rerun the cell") from None
        if not isinstance(summary, dict) or not all(isinstance(summary.get(k), (int, float)) for k in (
                "final/rouge_l", "final/loss")):
            raise SystemExit(f"instruct.py: {out / 'summary.json'} lacks final/rouge_l or final/loss; delete that "
                             "run folder to rerun the cell")
        return summary
    if report_only:
        return None
    cfg = config.validate(config.resolve_environment(config.apply_overrides(config.Config(), overrides)))
    marks: dict = {}

    def built(_fed) -> None:
        marks["peak_was_reset"] = memory.reset_peak()

    summary = simulate(cfg, out, resume=(out / "config.toml").is_file(), progress=False, on_built=built)
    summary["peak_rss_mb"] = memory.peak_mb() if marks.get("peak_was_reset") else memory.lifetime_peak_mb()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def method_lr(method: str, factor: float) -> float:
    spec = get_method(OWN_SETTING.get(method, {}).get("lr_from", method))
    return preset_lr(spec, spec.density) * factor


def tune_and_test(method: str, args: argparse.Namespace, work: Path,
                  base: list[str]) -> tuple[dict | None, list[dict], list[Path]]:
    """One method: its lr chosen on the validation split (seed 0, best final ROUGE-L, then lowest loss), then a
    test cell per seed at that lr. ``--report-only``: the finished cells only (a method whose tuning has not
    finished is left out; its unfinished seeds are missing from the table)."""
    own = OWN_SETTING.get(method, {})
    label, base = own.get("label", method), base + [f"method={method}", *own.get("overrides", [])]
    lr_key = get_method(method).lr_key  # fo.lr for the first-order bound, zo.lr for the rest
    tried = []
    for factor in args.lr_factors if len(args.lr_factors) > 1 else []:
        lr = method_lr(method, factor)
        summary = run_cell(work / "tune" / f"{label}-lr{lr:.3g}", base + [
            f"{lr_key}={lr}", "task.eval_split=validation",
            f"task.validation_size={args.validation_size}", "run.seed=0"], args.report_only)
        if summary is None:
            return None, [], []
        tried.append({"lr": lr, "factor": factor, "validation_rouge_l": summary["final/rouge_l"],
                      "validation_loss": summary["final/loss"]})
    best = max(tried, key=lambda t: (t["validation_rouge_l"], -t["validation_loss"])) if tried else None
    chosen = {"lr": best["lr"] if best else method_lr(method, args.lr_factors[0]), "grid": tried}
    cells, folders = [], []
    for seed in args.seeds:
        out = work / "test" / f"{label}-seed{seed}"
        summary = run_cell(out, base + [f"{lr_key}={chosen['lr']}", f"run.seed={seed}"], args.report_only)
        if summary is None:
            continue
        folders.append(out)
        cells.append({"method": label, "seed": seed, "lr": chosen["lr"], **{k: summary.get(k) for k in SUMMARY_KEYS}})
    return chosen, cells, folders


def paired(cells: list[dict], method: str, reference: str, key) -> str:
    """method minus reference per seed, mean ± its standard error, and what that allows one to say."""
    if method == reference:
        return "reference"
    by = {m: {c["seed"]: key(c) for c in cells if c["method"] == m} for m in (method, reference)}
    found = paired_difference(by[method], by[reference])
    if found is None:
        return "fewer than 3 shared seeds"
    diff, se = found
    word = "higher" if diff > detectable(se) else "lower" if diff < -detectable(se) else "within noise"
    return f"{diff:+.4f} ± {se:.4f} ({word}; detectable {detectable(se):.4f})"


def summarise(cells: list[dict], chosen: dict, methods: list[str]) -> list[dict]:
    table = []
    for method in methods:
        rows = [c for c in cells if c["method"] == method]
        if not rows:
            continue
        gain = [c["final/rouge_l"] - c["zero_shot/rouge_l"] for c in rows]
        loss = [c["final/loss"] - c["zero_shot/loss"] for c in rows]
        table.append({
            "method": method, "lr": chosen[method]["lr"], "seeds": len(rows),
            "rouge_l_final_mean": statistics.mean(c["final/rouge_l"] for c in rows),
            "rouge_l_gain_mean": statistics.mean(gain), "rouge_l_gain_sd": statistics.stdev(gain) if len(gain) > 1 else None,
            "loss_change_mean": statistics.mean(loss), "loss_change_sd": statistics.stdev(loss) if len(loss) > 1 else None,
            "rouge_l_gain_vs_meerkat": paired(cells, method, "meerkat", lambda c: c["final/rouge_l"] - c["zero_shot/rouge_l"]),
            "loss_change_vs_meerkat": paired(cells, method, "meerkat", lambda c: c["final/loss"] - c["zero_shot/loss"]),
            "bytes_up_per_round": rows[0]["bytes_up_per_round"], "bytes_down_per_round": rows[0]["bytes_down_per_round"],
            "wall_seconds_mean": statistics.mean(c["wall_seconds"] for c in rows),
            "peak_rss_mb_max": max(c["peak_rss_mb"] or 0 for c in rows),
        })
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr-factors", nargs="+", type=float, default=[1.0, 4.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sample-count", type=int, default=None, help="clients per round (default: all)")
    parser.add_argument("--eval-every", type=int, default=None, help="rounds (default: only at the end)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval-size", type=int, default=16)
    parser.add_argument("--validation-size", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("MEERKAT_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--report-only", action="store_true", help="report the finished cells, run nothing")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-instruct"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "instruct.json"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "instruct.png"))
    args = parser.parse_args()
    work, base = Path(args.work), base_overrides(args)

    chosen: dict[str, dict] = {}
    cells: list[dict] = []
    first_seed_folders: list[Path] = []
    labels = [OWN_SETTING.get(method, {}).get("label", method) for method in args.methods]
    for method, label in zip(args.methods, labels):
        found, method_cells, folders = tune_and_test(method, args, work, base)
        if found is None or not method_cells:
            print(f"{label}: no finished cells, left out of the report")
            continue
        chosen[label] = found
        cells += method_cells
        first_seed_folders.append(folders[0])

    table = summarise(cells, chosen, labels)
    print(f"{'method':<12} {'lr':>9} {'seed':>4} {'zero-shot R-L':>13} {'final R-L':>9} {'loss 0->T':>15} "
          f"{'up B/rnd':>9} {'down B/rnd':>11} {'wall s':>7} {'peak MB':>8}")
    for c in cells:
        print(f"{c['method']:<12} {c['lr']:>9.3g} {c['seed']:>4} {c['zero_shot/rouge_l']:>13.4f} {c['final/rouge_l']:>9.4f} "
              f"{c['zero_shot/loss']:>7.4f}->{c['final/loss']:<7.4f} {c['bytes_up_per_round']:>9.0f} "
              f"{c['bytes_down_per_round']:>11.0f} {c['wall_seconds']:>7.0f} {c['peak_rss_mb'] or 0:>8.0f}")
    print("\nmethod minus Meerkat, per seed (mean ± SE):")
    for row in table:
        print(f"  {row['method']:<12} ROUGE-L gain {row['rouge_l_gain_vs_meerkat']}; "
              f"loss change {row['loss_change_vs_meerkat']}")
    result = {"setting": vars(args) | {"overrides": base}, "chosen_lr": chosen, "cells": cells, "table": table,
              "date": datetime.date.today().isoformat(), "platform": platform.platform()}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot_runs(first_seed_folders, args.plot, title=f"Dolly, {args.clients} clients by category: ROUGE-L (seed {args.seeds[0]})")
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
