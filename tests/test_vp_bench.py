"""Meerkat-vp's benchmark helpers: which cached prefixes vp.py may continue as unclipped runs, and
label_shares.py's per-label view of a finished run."""

from __future__ import annotations

import importlib.util
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


def test_a_prefix_continues_unclipped_only_when_its_clip_never_changed_a_scalar(vp, tmp_path):
    quiet = write_rows(tmp_path / "quiet", [round_row(1, {"0": 0, "1": 0}), round_row(2, {"0": 0, "1": 0})])
    assert vp.never_clipped(quiet)

    clipped = write_rows(tmp_path / "clipped", [round_row(1, {"0": 0, "1": 0}), round_row(2, {"0": 0, "1": 3})])
    assert not vp.never_clipped(clipped)

    rejected = write_rows(tmp_path / "rejected", [round_row(1, {"0": 0}, rejected={"1": "wrong step count"})])
    assert not vp.never_clipped(rejected)

    # a run under fed.clip='none' logs no clip fields at all: nothing was changed
    unclipped = write_rows(tmp_path / "unclipped", [{"round": 1, "rejected": {}}])
    assert vp.never_clipped(unclipped)


def test_a_damaged_prefix_log_is_a_one_line_data_error(vp, tmp_path):
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe not json\n")
    with pytest.raises(DataError, match="not UTF-8"):
        vp.never_clipped(run)


@pytest.fixture()
def shares(monkeypatch):
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
    summary = simulate(config.apply_overrides(tiny_cfg, ["fed.rounds=2"]), run, progress=False)
    out = shares.run_shares(run)
    assert out["accuracy"] == pytest.approx(summary["final/accuracy"])
    assert sum(out["predicted_share"]) == pytest.approx(1.0) and sum(out["true_share"]) == pytest.approx(1.0)
