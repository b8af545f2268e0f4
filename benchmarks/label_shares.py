"""Which labels a finished classification run predicts: accuracy, each label's share of the predictions and each
label's recall on the run's own test split, from its config.toml and patch.safetensors.

Accuracy alone hides the failure Non-IID training invites, a model that drifts towards the labels it saw most.
Written for Meerkat-vp at the drift budget (issue 17): stopping one of two opposite one-label clients leaves the
other's label unopposed. Each run folder costs one evaluation (about 2 minutes for SST-2's 872 rows on one
thread).

    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/label_shares.py \
        runs/vp_drift/sst2-seed2/meerkat runs/vp_drift/sst2-seed2/meerkat_vp --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from meerkat_fl import config
from meerkat_fl.build import build_model, build_task_data
from meerkat_fl.errors import MeerkatError
from meerkat_fl.patch import apply_patch, load_patch
from meerkat_fl.tasks.base import EncodedData, predict


def label_shares(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, list[float] | float]:
    """Accuracy, each label's share of the predictions and each label's recall (NaN for a label with no rows)."""
    recall = [float((predictions[labels == c] == c).mean()) if (labels == c).any() else float("nan")
              for c in range(num_labels)]
    return {"accuracy": float((predictions == labels).mean()),
            "predicted_share": [float((predictions == c).mean()) for c in range(num_labels)],
            "true_share": [float((labels == c).mean()) for c in range(num_labels)], "recall": recall}


def run_shares(run: Path) -> dict[str, list[float] | float]:
    """The shares of ``run``'s final model (base model plus its patch) on its configured test split."""
    cfg = config.resolve_environment(config.load(run / "config.toml"))
    loaded = build_model(cfg)
    apply_patch(loaded.model, load_patch(run / "patch.safetensors"), loaded.fingerprint)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    if not isinstance(data.test, EncodedData):
        raise MeerkatError(f"{run}: label shares need a verbalizer classification task, not {cfg.task.name!r}")
    predictions = predict(loaded.model, data.test, batch_size=cfg.task.eval_batch_size)
    return label_shares(predictions, data.test.labels, data.scorer.task.num_labels)


def fmt(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (config.toml, patch.safetensors)")
    parser.add_argument("--json", type=Path, help="write {run folder: shares} here")
    args = parser.parse_args()
    out = {}
    print("| run | accuracy | predicted share per label | recall per label |\n|---|---|---|---|")
    for run in args.runs:
        try:
            shares = run_shares(run)
        except MeerkatError as exc:
            sys.exit(f"error: {exc}")
        out[str(run)] = shares
        print(f"| {run} | {shares['accuracy']:.3f} | {fmt(shares['predicted_share'])} | {fmt(shares['recall'])} |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
