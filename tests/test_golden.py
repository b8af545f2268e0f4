"""A golden loss curve: 3 Meerkat rounds (sensitive mask) on the tiny model and the synthetic task.

Guards numerical drift: a change to the noise, the seeds, the step, the aggregation, the data order or the
scoring moves these numbers by far more than the tolerance (BLAS differences between CPUs stay below it).
The run is Meerkat as the paper defines it, so the server's robust clip (fed.clip, on by default; tested in
test_robust.py) is off here. Regenerate only when a change is meant to alter what is computed, and say so in
the commit:
    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/test_golden.py
and paste the printed lists below.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate

GOLDEN_TRAIN_LOSS = [0.7017026543617249, 0.7187591195106506, 0.7168782502412796]  # per round, mean over the sampled clients' local steps
GOLDEN_EVAL_LOSS = [0.7151775062084198, 0.7149476408958435, 0.7147728204727173]  # per round, on the synthetic test slice


def meerkat_curve(calibration: str, out: Path) -> tuple[list[float], list[float]]:
    """(train loss, eval loss) per round of 3 Meerkat rounds on configs/tiny.toml."""
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml", [
        "mask.kind=sensitive", f"mask.calibration={calibration!r}", "mask.calibration_sequences=4",
        "mask.calibration_seq_len=32", "fed.rounds=3", "run.zero_shot=false", "fed.clip=none",
    ])
    simulate(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows], [row["eval/loss"] for row in rows]


def test_three_meerkat_rounds_reproduce_the_golden_losses(calibration_text, tmp_path):
    train, evaluation = meerkat_curve(calibration_text, tmp_path / "run")
    assert train == pytest.approx(GOLDEN_TRAIN_LOSS, rel=1e-5, abs=0)
    assert evaluation == pytest.approx(GOLDEN_EVAL_LOSS, rel=1e-5, abs=0)


if __name__ == "__main__":
    from meerkat_fl.tasks import get_task

    folder = Path(tempfile.mkdtemp())
    text = folder / "synthetic.txt"  # what conftest's calibration_text fixture writes
    text.write_text("\n".join(get_task("synthetic").load("train").prompts) + "\n")
    train, evaluation = meerkat_curve(str(text), folder / "run")
    print(f"GOLDEN_TRAIN_LOSS = {train!r}\nGOLDEN_EVAL_LOSS = {evaluation!r}", file=sys.stdout)
