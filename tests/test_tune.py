"""`meerkat tune`: a grid of normal runs scored on a held-out validation split; best config; resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meerkat_fl import config
from meerkat_fl.cli import main
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.tune import (
    best_index,
    default_grid,
    grid_points,
    parse_grid,
    point_config,
    point_name,
    run_score,
    scale_grid,
    tune,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
# The tiny config on the demo's shipped data (no data folder needed), one short round.
SMALL = ["task.name=dbpedia", "task.train_size=120", "task.eval_size=32", "task.validation_size=64",
         "fed.rounds=1", "mask.density=0.002"]


def test_default_grid_is_centred_on_the_configs_lr():
    cfg = config.load(None, ["zo.lr=4e-4"])
    assert default_grid(cfg) == {"zo.lr": [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]}


def test_scale_grid_rounds_to_the_digits_asked_for():
    # 5e-4 moved to density 1e-4 is 0.004999999999999999 in floats; 3 digits give the paper grid's cell names
    assert scale_grid({"zo.lr": 5e-4 * 1e-3 / 1e-4}, (1.0,))["zo.lr"] != [0.005]
    assert scale_grid({"zo.lr": 5e-4 * 1e-3 / 1e-4}, (0.25, 1.0, 4.0), significant=3) == {"zo.lr": [0.00125, 0.005, 0.02]}
    assert scale_grid({"zo.lr": 5e-4}, (1 / 16, 4096.0), significant=3) == {"zo.lr": [3.13e-05, 2.05]}


def test_best_index_breaks_ties_by_grid_order_or_by_the_smallest_point():
    points = [{"zo.lr": 4e-4}, {"zo.lr": 1e-4}, {"zo.lr": 2e-4}, {"zo.lr": 8e-4}]
    scores = [0.60, 0.70, 0.70, None]  # the last point has no score yet: never the best
    assert best_index(points, scores) == 1
    assert best_index(points, [0.7, 0.6, 0.7, 0.7], ties="first") == 0
    assert best_index(points, [0.7, 0.6, 0.7, 0.7], ties="smallest") == 2  # 2e-4 < 4e-4 < 8e-4
    assert best_index(points, [None, None, 0.1, None]) == 2
    with pytest.raises(ConfigError, match="ties"):
        best_index(points, scores, ties="largest")
    with pytest.raises(ConfigError, match="3 scores"):
        best_index(points, scores[:3])


def test_run_score_reads_named_and_old_summaries():
    assert run_score({"final/accuracy": 0.7, "primary_metric": "accuracy"}) == 0.7
    assert run_score({"final_eval_accuracy": 0.6, "zero_shot_accuracy": 0.5}, "sst2", "zero_shot") == 0.5
    assert run_score({}) is None


def test_grid_option_parses_values_and_crosses_keys():
    grid = parse_grid(["zo.lr=1e-4,2e-4", "zo.eps=1e-3"])
    assert grid == {"zo.lr": [1e-4, 2e-4], "zo.eps": [1e-3]}
    assert grid_points(grid) == [{"zo.lr": 1e-4, "zo.eps": 1e-3}, {"zo.lr": 2e-4, "zo.eps": 1e-3}]
    assert point_name(grid_points(grid)[0]) == "zo.lr=0.0001,zo.eps=0.001"
    for bad in ("zo.lr", "lr=1e-4", "zo.lr="):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid([bad])


def test_points_are_scored_on_validation_never_test():
    cfg = point_config(config.load(TINY), {"zo.lr": 1e-3})
    assert cfg.task.eval_split == "validation" and cfg.zo.lr == 1e-3
    with pytest.raises(ConfigError, match="zo.eps"):
        point_config(config.load(TINY), {"zo.eps": -1.0})


def test_tune_cli_picks_the_best_on_validation_and_writes_its_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEERKAT_DATA_DIR", raising=False)
    out = tmp_path / "sweep"
    args = ["tune", str(TINY), *(f"--set={item}" for item in SMALL), "--grid", "zo.lr=1e-3,3e-2", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "tune.json").read_text())
    scores = [p["score"] for p in result["points"]]
    assert result["metric"] == "accuracy"
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert result["best"] == result["points"][scores.index(max(scores))]["point"]
    for entry in result["points"]:
        run_cfg = config.load(Path(entry["folder"]) / "config.toml")
        assert run_cfg.task.eval_split == "validation" and run_cfg.zo.lr == entry["point"]["zo.lr"]
    best = config.load(out / "best.toml")
    assert best.zo.lr == result["best"]["zo.lr"] and best.task.eval_split == "test" and best.task.name == "dbpedia"
    assert "best" in printed and str(out / "best.toml") in printed


def test_tune_skips_finished_points_and_resumes_a_killed_one(tmp_path, monkeypatch, assert_same_run):
    monkeypatch.delenv("MEERKAT_DATA_DIR", raising=False)
    base = config.resolve_environment(config.load(TINY, [*SMALL, "fed.rounds=2"]))
    grid = {"zo.lr": [1e-3, 3e-2]}
    finished, killed = (tmp_path / "sweep" / "points" / point_name(p) for p in grid_points(grid))
    simulate(point_config(base, {"zo.lr": 1e-3}), finished, progress=False)
    simulate(point_config(base, {"zo.lr": 3e-2}), killed, progress=False, stop_after=1)  # a checkpoint at round 1
    metrics_before = (finished / "metrics.jsonl").read_bytes()
    results = tune(base, tmp_path / "sweep", grid, progress=False)
    assert [r.status for r in results] == ["done before", "resumed"]
    assert (finished / "metrics.jsonl").read_bytes() == metrics_before
    simulate(point_config(base, {"zo.lr": 3e-2}), tmp_path / "straight", progress=False)
    assert_same_run(killed, tmp_path / "straight")
    again = tune(base, tmp_path / "sweep", grid, progress=False)
    assert [r.status for r in again] == ["done before", "done before"]
    assert [r.score for r in again] == [r.score for r in results]


def test_a_point_folder_from_another_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MEERKAT_DATA_DIR", raising=False)
    base = config.resolve_environment(config.load(TINY, SMALL))
    folder = tmp_path / "sweep" / "points" / "zo.lr=0.001"
    simulate(point_config(base, {"zo.lr": 1e-3}), folder, progress=False)
    with pytest.raises(ConfigError, match="another config"):
        tune(config.apply_overrides(base, ["run.seed=1"]), tmp_path / "sweep", {"zo.lr": [1e-3]}, progress=False)


def test_default_centre_is_the_configs_lr_or_the_methods_preset_at_its_density():
    from meerkat_fl import config
    from meerkat_fl.methods import get_method
    from meerkat_fl.tune import default_center

    assert default_center(config.load(None, ["zo.lr=3e-4"])) == {"zo.lr": 3e-4}
    assert default_center(config.load(None, ["method=full_fedzo"])) == {"zo.lr": get_method("full_fedzo").lr}
    sparse = default_center(config.load(None, ["method=meerkat", "mask.density=1e-2"]))["zo.lr"]
    assert abs(sparse - get_method("meerkat").lr / 10) < 1e-12
