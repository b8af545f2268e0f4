"""benchmarks/round_shares.py: each round's largest replay weight, rebuilt from a cached cell; and
build.train_rows, through which it (and `meerkat partition`) re-partitions a run's own training rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from meerkat_fl import config
from meerkat_fl.build import partition_for, train_rows
from meerkat_fl.errors import DataError
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.partition import load_partition

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def shares(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # where the script finds paper_grid
    monkeypatch.delitem(sys.modules, "paper_grid", raising=False)
    spec = importlib.util.spec_from_file_location("round_shares", REPO / "benchmarks" / "round_shares.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_largest_share_follows_the_servers_weighting(shares):
    rounds = {1: [0, 1, 2], 2: [1, 2]}
    sizes = [450, 30, 20]
    by_size = shares.largest_shares(rounds, sizes, "data_size")
    assert by_size[0] == (0, pytest.approx(0.9)) and by_size[1] == (1, pytest.approx(0.6))
    assert shares.largest_shares(rounds, sizes, "uniform") == [(0, pytest.approx(1 / 3)), (1, pytest.approx(0.5))]
    with pytest.raises(DataError, match="outside 0..2"):
        shares.largest_shares({1: [0, 3]}, sizes, "data_size")


def test_rounds_come_from_gradip_records_and_bad_ones_are_named(shares):
    cell = {"gradip": [{"round": 2, "client_id": 4, "gradip": []}, {"round": 1, "client_id": 0, "gradip": []},
                       {"round": 2, "client_id": 1, "gradip": []}]}
    assert shares.rounds_of(cell, "c") == {1: [0], 2: [4, 1]}
    with pytest.raises(DataError, match="no GradIP records"):
        shares.rounds_of({"summary": {}}, "c")
    with pytest.raises(DataError, match="lacks an integer round"):
        shares.rounds_of({"gradip": [{"round": "1", "client_id": 0}]}, "c")


def test_a_broken_cell_file_is_one_line_and_exit_2(shares, tmp_path, capsys):
    bad = tmp_path / "cell.json"
    bad.write_text("{not json")
    assert shares.main([str(bad), "--json", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a paper cell" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.json").exists()
    for text in ("[1, 2]", json.dumps({"cell": {"task": "sst2", "bogus": 1}})):  # valid JSON, not a cell
        bad.write_text(text)
        assert shares.main([str(bad), "--json", str(tmp_path / "out.json")]) == 2
        assert "not a paper cell" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["test", "validation"])
def test_train_rows_rebuilds_the_partition_a_run_trained_on(tiny_cfg, tmp_path, split):
    cfg = config.apply_overrides(tiny_cfg, ["fed.partition='dirichlet'", "fed.alpha=0.1", "fed.rounds=1",
                                            f"task.eval_split='{split}'"])
    simulate(cfg, tmp_path / "run", progress=False)
    ran = load_partition(tmp_path / "run" / "partition.json")
    _, train, _ = train_rows(cfg.task, cfg.run.seed)
    rebuilt = partition_for(cfg, np.asarray(train.partition_labels))
    assert len(rebuilt.clients) == len(ran.clients)
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt.clients, ran.clients))


def test_rebuilt_shares_of_a_cached_drift_cell_match_its_own_records(shares, data_dir, monkeypatch):
    monkeypatch.setenv("MEERKAT_DATA_DIR", data_dir)
    assert shares.DEFAULT_CELLS, "the AG News Dirichlet 0.1 drift cells are committed under results/paper/cells"
    path = shares.DEFAULT_CELLS[0]
    row, cell = shares.cell_shares(path), json.loads(path.read_text())
    assert sum(row["sizes"]) == 2000 and len(row["sizes"]) == cell["summary"]["num_clients"]  # task.train_size
    assert row["rounds"] == cell["summary"]["rounds"] == len(row["largest_share"])
    assert all(0 < s <= 1 for s in row["largest_share"]) and row["final_accuracy"] == cell["summary"]["final/accuracy"]
