"""Plots and tables read metrics by name, from new run folders and from those written before names."""

from __future__ import annotations

import json

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.report import comparison_table, load_run, plot_runs
from meerkat_fl.rundir import EVAL, FINAL, ZERO_SHOT, prefixed, read_metric, unprefixed


def test_metric_keys_carry_their_prefix_and_old_keys_still_read():
    assert prefixed(EVAL, {"accuracy": 0.5, "loss": 0.7}) == {"eval/accuracy": 0.5, "eval/loss": 0.7}
    assert unprefixed(FINAL, {"final/accuracy": 0.6, "final_eval_accuracy": 0.1, "rounds": 3}) == {"accuracy": 0.6}
    old = {"eval_accuracy": 0.4, "zero_shot_accuracy": 0.3, "final_eval_accuracy": 0.45}
    assert [read_metric(old, when, "accuracy") for when in (EVAL, ZERO_SHOT, FINAL)] == [0.4, 0.3, 0.45]
    assert read_metric(old, FINAL, "loss") is None


def test_plot_and_table_show_the_primary_metric_of_new_and_old_runs(tiny_cfg, tmp_path):
    new = tmp_path / "new"
    summary = simulate(config.apply_overrides(tiny_cfg, ["fed.rounds=2"]), new, progress=False)
    old = tmp_path / "old"  # a run folder as written before metrics had names
    old.mkdir()
    rows = [{"round": 1, "train_loss": 0.7, "bytes_up": 10, "bytes_down": 20, "eval_accuracy": 0.625}]
    (old / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (old / "summary.json").write_text(json.dumps({"method": "meerkat", "task": "sst2", "zero_shot_accuracy": 0.5,
                                                  "final_eval_accuracy": 0.625, "bytes_up_per_round": 10,
                                                  "bytes_down_per_round": 20, "wall_seconds": 3}))
    assert load_run(old)[2]["primary_metric"] == load_run(new)[2]["primary_metric"] == "accuracy"
    table = comparison_table([new, old]).splitlines()
    assert f"| {summary['final/accuracy']:.3f} |" in table[2] and "| 0.500 | 0.625 |" in table[3]
    assert plot_runs([new, old], tmp_path / "plot.png").stat().st_size > 0
