"""What the robust clip's factor costs honest learning: SmolLM2-135M, SST-2, all clients honest.

The integration test's setting (4 clients, Dirichlet 0.5, 4 rounds of T = 5, batch 8, lr 1e-3, 400 training and
200 test examples, a sensitive mask from 8 WikiText sequences), one seed, with fed.clip = none and with the
norm clip at factors 4 and 2. Prints a table and writes JSON (default benchmarks/results/clip_factor.json).

    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/clip_factor.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

from meerkat_fl import config
from meerkat_fl.build import make_mask
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.masks import save_mask
from meerkat_fl.models import load_model

SETTINGS = {"none": ["fed.clip=none"], "norm x4": ["fed.clip=norm", "fed.clip_factor=4"],
            "norm x2": ["fed.clip=norm", "fed.clip_factor=2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/clip_factor.json")
    args = parser.parse_args()
    data = os.environ.get("MEERKAT_DATA_DIR", "../shared/data")
    base = config.resolve_environment(config.load(None, ["mask.calibration_sequences=8"]), {"MEERKAT_DATA_DIR": data})
    folder = Path(tempfile.mkdtemp(prefix="clip-factor-"))
    mask_path = save_mask(make_mask(base.mask, load_model("smollm2")), folder / "mask.safetensors")
    rows = {}
    for name, extra in SETTINGS.items():
        cfg = config.load(None, [
            f"task.data_dir={data!r}", f"mask.path={str(mask_path)!r}", "task.train_size=400", "task.eval_size=200",
            "task.max_length=48", "task.eval_batch_size=50", "zo.lr=1e-3", "zo.batch_size=8", "fed.num_clients=4",
            "fed.rounds=4", "fed.local_steps=5", "fed.alpha=0.5", "run.eval_every=4", *extra])
        summary = simulate(cfg, folder / name.replace(" ", "_"), progress=False)
        rows[name] = {"overrides": extra, "zero_shot_accuracy": summary["zero_shot/accuracy"],
                      "final_accuracy": summary["final/accuracy"]}
        print(f"{name:8s}  zero-shot {rows[name]['zero_shot_accuracy']:.3f}  final {rows[name]['final_accuracy']:.3f}",
              flush=True)
    Path(args.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "seed": 0, "runs": rows,
                                           "command": "python benchmarks/clip_factor.py"}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
