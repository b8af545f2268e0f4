"""Meerkat-vp's benchmark helpers: which cached prefixes vp.py may continue as unclipped runs, and
label_shares.py's per-label view of a finished run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from meerkat_fl import config
from meerkat_fl.errors import DataError
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def vp(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # where the script finds paper_grid and paper_report
    for name in ("paper_grid", "paper_report"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("vp_bench", REPO / "benchmarks" / "vp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    run = RunDir(path)
    for row in rows:
        run.append_metrics(row)
    return path


def round_row(n: int, clipped: dict[str, int], rejected: dict[str, str] | None = None) -> dict:
    return {"round": n, "clip_bound": 0.5, "clipped_by_client": clipped, "rejected": rejected or {}}


def test_a_prefix_whose_clip_never_changed_a_scalar_continues_unclipped(vp, tmp_path):
    quiet = write_rows(tmp_path / "quiet", [round_row(1, {"0": 0, "1": 0}), round_row(2, {"0": 0, "1": 0})])
    assert vp.never_clipped(quiet)


def test_a_prefix_with_one_clipped_scalar_does_not(vp, tmp_path):
    clipped = write_rows(tmp_path / "clipped", [round_row(1, {"0": 0, "1": 0}), round_row(2, {"0": 0, "1": 3})])
    assert not vp.never_clipped(clipped)


def test_a_prefix_with_a_rejected_reply_does_not(vp, tmp_path):
    rejected = write_rows(tmp_path / "rejected", [round_row(1, {"0": 0}, rejected={"1": "wrong step count"})])
    assert not vp.never_clipped(rejected)


def test_a_prefix_run_without_a_clip_logs_no_clip_fields_and_continues(vp, tmp_path):
    assert vp.never_clipped(write_rows(tmp_path / "unclipped", [{"round": 1, "rejected": {}}]))


def test_the_seed_mean_skips_seeds_without_a_number(vp):
    assert vp.finite_mean_std([0.5, None, 0.7, float("nan")]) == pytest.approx((0.6, 0.1414213562))
    assert vp.finite_mean_std([0.5]) == (0.5, 0.0)
    assert all(np.isnan(vp.finite_mean_std([None, float("nan")])))


@pytest.fixture()
def shares():
    spec = importlib.util.spec_from_file_location("label_shares", REPO / "benchmarks" / "label_shares.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_shares_show_a_model_that_predicts_one_label(shares):
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    out = shares.label_shares(np.array([1, 1, 1, 0, 1, 1, 1, 1]), labels, 3)
    assert out["accuracy"] == pytest.approx(5 / 8)
    assert out["predicted_share"] == pytest.approx([1 / 8, 7 / 8, 0.0])
    assert out["true_share"] == pytest.approx([0.5, 0.5, 0.0])
    assert out["recall"][:2] == pytest.approx([0.25, 1.0]) and np.isnan(out["recall"][2])  # label 2: no rows


def test_label_shares_of_a_finished_run_reproduce_its_reported_accuracy(shares, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    # density 0.1: the patch moves enough weights for the tiny model's predictions to change
    summary = simulate(config.apply_overrides(tiny_cfg, ["fed.rounds=2", "mask.density=0.1"]), run, progress=False)
    assert summary["final/accuracy"] != summary["zero_shot/accuracy"]
    out = shares.run_shares(run)
    assert out["accuracy"] == pytest.approx(summary["final/accuracy"])
    assert sum(out["predicted_share"]) == pytest.approx(1.0) and sum(out["true_share"]) == pytest.approx(1.0)

    # a summary that does not match the folder's patch is refused, not described
    (run / "summary.json").write_text(json.dumps({**summary, "final/accuracy": 0.123}))
    with pytest.raises(DataError, match="differs from the reported 0.1230"):
        shares.run_shares(run)


def test_a_folder_that_is_not_a_finished_run_is_a_one_line_error_before_any_evaluation(shares, tmp_path, capsys,
                                                                                          monkeypatch):
    (tmp_path / "good").mkdir()
    monkeypatch.setattr(sys, "argv", ["label_shares.py", str(tmp_path / "missing"), "--json", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match=r"label_shares: error: config file .*missing/config.toml does not exist"):
        shares.main()
    monkeypatch.setattr(sys, "argv", ["label_shares.py", str(tmp_path / "good"), "--json", str(tmp_path)])
    with pytest.raises(SystemExit, match="is a folder; give a file path"):
        shares.main()
    assert not (tmp_path / "o.json").exists()
