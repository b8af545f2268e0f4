"""Which labels a finished classification run predicts: accuracy, each label's share of the predictions and each
label's recall on the run's own test split, from its config.toml and patch.safetensors.

Accuracy alone hides the failure Non-IID training invites, a model that drifts towards the labels it saw most.
Written for Meerkat-vp at the drift budget (issue 17), where stopping one of two opposite one-label clients
leaves the other's label unopposed. Each run folder costs one evaluation (about 2 minutes for SST-2's 872 rows
on one thread). The accuracy recomputed here must equal the one the run reported in summary.json, so the
shares are known to describe the run's own final model on its own test rows.

    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/label_shares.py \
        runs/vp_drift/sst2-seed2/meerkat runs/vp_drift/sst2-seed2/meerkat_vp --json out.json

With no run folders it reads the three runs of ``benchmarks/vp.py --profile drift``'s SST-2 seed 2 (written to
results/vp_drift/label_shares-sst2-seed2.json), or says that they are not there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meerkat_fl import config
from meerkat_fl.build import build_model, build_task_data
from meerkat_fl.errors import DataError, MeerkatError
from meerkat_fl.patch import apply_patch, load_patch
from meerkat_fl.paths import output_file
from meerkat_fl.rundir import FINAL, RunDir, json_safe, read_metric
from meerkat_fl.tasks.base import EncodedData, predict

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = [REPO / "runs" / "vp_drift" / "sst2-seed2" / m for m in ("meerkat", "meerkat_vp", "random_stop")]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "vp_drift" / "label_shares-sst2-seed2.json"


def label_shares(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, list[float] | float]:
    """Accuracy, each label's share of the predictions and each label's recall (NaN for a label with no rows)."""
    recall = [float((predictions[labels == c] == c).mean()) if (labels == c).any() else math.nan
              for c in range(num_labels)]
    return {"accuracy": float((predictions == labels).mean()),
            "predicted_share": [float((predictions == c).mean()) for c in range(num_labels)],
            "true_share": [float((labels == c).mean()) for c in range(num_labels)], "recall": recall}


def check_run(run: Path) -> tuple[config.Config, float]:
    """``run``'s config and its reported final accuracy, read before any model is loaded; a folder that is not
    a finished verbalizer classification run is a one-line error."""
    cfg = config.resolve_environment(config.load(run / "config.toml"))
    if not (run / "patch.safetensors").is_file():
        raise DataError(f"{run}: no patch.safetensors (not a finished run)")
    summary = RunDir(run).read_json("summary.json") if (run / "summary.json").is_file() else {}
    reported = read_metric(summary, FINAL, "accuracy")
    if not isinstance(reported, (int, float)) or isinstance(reported, bool):
        raise DataError(f"{run}: no summary.json with a final accuracy (not a finished classification run)")
    return cfg, float(reported)


def run_shares(run: Path) -> dict[str, list[float] | float]:
    """The shares of ``run``'s final model (base model plus its patch) on its configured test split."""
    cfg, reported = check_run(run)
    loaded = build_model(cfg)
    apply_patch(loaded.model, load_patch(run / "patch.safetensors"), loaded.fingerprint)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    if not isinstance(data.test, EncodedData):
        raise DataError(f"{run}: label shares need the verbalizer loss, not task.loss={cfg.task.loss!r}")
    predictions = predict(loaded.model, data.test, batch_size=cfg.task.eval_batch_size)
    shares = label_shares(predictions, data.test.labels, len(data.test.label_token_ids))
    if not math.isclose(shares["accuracy"], reported, abs_tol=1e-9):
        raise DataError(f"{run}: recomputed accuracy {shares['accuracy']:.4f} differs from the reported "
                        f"{reported:.4f}: the patch, the data or the code changed since the run")
    return shares


def fmt(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", help="finished run folders (default: vp.py's drift seed 2)")
    parser.add_argument("--json", type=Path, help="write {run folder: shares} here (after each run)")
    args = parser.parse_args()
    runs, out_path = args.runs, args.json
    if not runs:
        if not all(run.is_dir() for run in DEFAULT_RUNS):
            print(f"nothing to read: no run folders given and {DEFAULT_RUNS[0].parent} is not there "
                  "(benchmarks/vp.py --profile drift --tasks sst2 --seeds 2 makes it)")
            return
        runs, out_path = DEFAULT_RUNS, out_path or DEFAULT_JSON
    out: dict[str, dict] = {}
    try:
        if out_path:
            output_file(out_path, "--json")
        for run in runs:  # every folder checked before the first evaluation
            check_run(run)
        print("| run | accuracy | predicted share per label | recall per label |\n|---|---|---|---|")
        for run in runs:
            name = str(run.resolve().relative_to(REPO)) if run.resolve().is_relative_to(REPO) else str(run)
            shares = out[name] = run_shares(run)
            print(f"| {name} | {shares['accuracy']:.3f} | {fmt(shares['predicted_share'])} | "
                  f"{fmt(shares['recall'])} |", flush=True)
            if out_path:  # after each run, so a later failure loses nothing already computed
                out_path.write_text(json.dumps(json_safe(out), indent=1) + "\n")
    except MeerkatError as exc:
        sys.exit(f"label_shares: error: {exc}")


if __name__ == "__main__":
    main()
