"""benchmarks/vp.py: which cached prefixes may continue as unclipped runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from meerkat_fl.errors import DataError
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
