"""Every registered method runs a federated round on a generation task (the in-memory synthetic_instruct) with
the tiny model, in the simulator: the response loss trains, the run reports loss and ROUGE-L by name."""

from __future__ import annotations

import math

import pytest

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.methods import METHODS


def generation_config(base, method: str, calibration: str):
    extra = ["task.name='synthetic_instruct'", "task.train_size=80", "task.eval_size=6", "task.max_new_tokens=3",
             "task.max_length=40", "mask.kind='sensitive'", f"method={method!r}", f"mask.calibration={calibration!r}",
             "fed.rounds=1", "fed.partition='pathological'", "fed.labels_per_client=1", "vp.calibration_steps=2",
             "vp.early_window=[0, 1]", "vp.late_window=[1, 2]", "run.zero_shot=false"]
    if METHODS[method].defaults.get("fedkseed.pool_size"):
        extra.append("fedkseed.pool_size=64")
    if METHODS[method].fixed.get("mask.kind", METHODS[method].defaults.get("mask.kind")) == "dense":
        extra.append("zo.lr=1e-4")
    return config.validate(config.apply_overrides(base, extra))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_a_round_on_a_generation_task(tiny_cfg, calibration_text, tmp_path, method):
    summary = simulate(generation_config(tiny_cfg, method, calibration_text), tmp_path / method, progress=False)
    assert summary["method"] == method and summary["task_loss"] == "response"
    assert summary["primary_metric"] == "rouge_l" and 0.0 <= summary["final/rouge_l"] <= 1.0
    assert math.isfinite(summary["final/loss"]) and summary["rejected_replies"] == 0
    assert summary["bytes_up_per_round"] > 0
