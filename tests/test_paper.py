"""benchmarks/paper.py: the reproduction harness's cache, lr tuning, verdicts and worker locks.

The grid itself runs the embedded SmolLM2 for hours; here the same harness runs a two-method, one-claim grid
on the tiny random Llama and real SST-2, so every stage (tune on validation, test seeds, cache, report) runs
for real in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meerkat_fl.environment import device_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def paper(tmp_path, monkeypatch):
    """benchmarks/paper.py with its cache, run folders and locks under tmp_path, on the tiny model.

    The script and its modules (paper_grid, paper_cells, paper_gradip, paper_report) are loaded afresh for each
    test; settings
    and paths are patched on ``paper.grid``, where every module reads them, and runners on ``paper.cells``.
    """
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # where the script finds its modules
    monkeypatch.delenv("MEERKAT_PAPER_DEVICE", raising=False)  # cells on the CPU, whatever the shell says
    for name in ("paper_grid", "paper_cells", "paper_gradip", "paper_report"):  # fresh module state per test
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("paper_harness", REPO / "benchmarks" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = module.grid
    monkeypatch.setattr(grid, "REPO", tmp_path)
    monkeypatch.setattr(grid, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(grid, "CELLS", tmp_path / "results" / "paper" / "cells")
    monkeypatch.setattr(grid, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(grid, "LOCKS", tmp_path / "runs" / "locks")
    monkeypatch.setattr(grid, "BASE", [
        "model.source='tiny'", "task.train_size=200", "task.eval_size=32", "task.max_length=32",
        "task.validation_size=32", "zo.batch_size=4", "fed.num_clients=4", "fed.sample_count=2", "fed.rounds=2",
        "fed.local_steps=2", "fed.partition='dirichlet'", "fed.alpha=0.5", "run.eval_every=1",
        "run.checkpoint_every=1", "mask.calibration_sequences=4", "mask.calibration_seq_len=32",
    ])
    monkeypatch.setattr(grid, "CLAIMS", {"1": (["meerkat", "random"], ["base"], "tiny claim")})
    return module


def test_harness_tunes_on_validation_runs_test_seeds_and_rebuilds_from_the_cache(paper, monkeypatch, data_dir):
    monkeypatch.setenv("MEERKAT_DATA_DIR", data_dir)  # real SST-2 cells, sensitive masks from WikiText
    data = paper.collect(["sst2"], ["1"], [0, 1, 2], run=True)
    assert data["pending"] == []
    cells = sorted(p.stem for p in paper.grid.CELLS.glob("*.json"))
    assert json.loads((paper.grid.CELLS / f"{cells[0]}.json").read_text())["device"] == device_name("cpu")
    # each method's lr grid on validation (seed 0), then 3 test seeds x 2 methods at the chosen lr
    grid_points = len(paper.lr_grid("meerkat")) + len(paper.lr_grid("random"))
    assert grid_points == 3 + 9  # the random mask's grid has six more points above
    eps_cells = [c for c in cells if "-meerkat-eps" in c]  # Meerkat's epsilon check, at its tuned lr
    assert len(eps_cells) == 2 and all(c.startswith("validation-") for c in eps_cells)
    dense_check = [c for c in cells if c.startswith(f"validation-sst2-full_fedzo-base-lr{paper.DENSE_CHECK_LR:.3g}-")]
    assert len(dense_check) == 1  # Full-FedZO above its grid, a check on validation
    assert sum(c.startswith("validation-") for c in cells) == grid_points + 2 + 1
    for cell, eps in zip(sorted(eps_cells), ("0.01", "0.0001")):  # the run folder's resolved config
        assert f"eps = {eps}" in (paper.grid.RUNS / cell / "config.toml").read_text()
    check = data["eps_check"]["sst2"]
    assert check["lr"] == data["lrs"]["sst2"]["meerkat"]
    assert all(0 <= check[e] <= 1 for e in ("1e-4", "1e-3", "1e-2", "full_fedzo_above_grid"))
    assert sum(c.startswith("test-") for c in cells) == 6
    for method in ("meerkat", "random"):
        grid = data["tuning_grid"]["sst2"][method]
        chosen = data["lrs"]["sst2"][method]
        assert grid[str(chosen)] == max(grid.values())  # the best validation accuracy, never the test split
        result = data["results"][f"sst2/{method}/base"]
        assert result["seeds"] == [0, 1, 2] and len(result["accuracy"]) == 3
        assert all(0.0 <= a <= 1.0 for a in result["accuracy"])
        assert result["curves"][0][-1][1] > 0  # cumulative bytes grow along the curve

    def no_more_runs(*args, **kwargs):
        raise AssertionError("a cached cell was run again")

    monkeypatch.setattr(paper.cells, "simulate", no_more_runs)
    again = paper.collect(["sst2"], ["1"], [0, 1, 2], run=True)
    assert again["results"] == data["results"] and again["lrs"] == data["lrs"]

    monkeypatch.setattr(sys, "argv", ["paper.py", "--report-only", "--tasks", "sst2", "--claims", "1"])
    paper.main()
    payload = json.loads((paper.grid.RESULTS / "paper.json").read_text())
    assert payload["cells_cached"] == grid_points + 3 + 6 and payload["results"] == json.loads(json.dumps(data["results"]))
    tables = (paper.grid.RESULTS / "paper" / "tables.md").read_text()
    assert "meerkat vs random:" in tables and "chosen" in tables and "Checks beyond the grids" in tables
    assert (paper.grid.RESULTS / "paper" / "accuracy.png").stat().st_size > 0


def test_verdict_needs_three_seeds_and_two_standard_errors(paper):
    assert paper.verdict([0.6, 0.61, 0.62], [0.5, 0.51, 0.52]).startswith("holds (+0.100")
    assert paper.verdict([0.5, 0.51, 0.52], [0.6, 0.61, 0.62]).startswith("does not hold (-0.100")
    assert paper.verdict([0.5, 0.6, 0.7], [0.55, 0.45, 0.65]).startswith("inconclusive (+0.050")
    assert paper.verdict([0.9, 0.9], [0.1, 0.1]) == "inconclusive (fewer than 3 seeds)"


def test_paired_verdict_cancels_the_shared_seed_spread(paper):
    # each seed moves both methods together (its test subsample): unpaired it is noise, paired it holds
    a, b = {0: 0.70, 1: 0.71, 2: 0.745}, {0: 0.68, 1: 0.685, 2: 0.72}
    assert paper.verdict(list(a.values()), list(b.values())).startswith("inconclusive (+0.023")
    assert paper.paired_verdict(a, b).startswith("holds (+0.023")
    assert paper.paired_verdict(b, a).startswith("does not hold (-0.023")
    assert paper.paired_verdict({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.5, 1: 0.6, 2: 0.7}) == \
        "no effect larger than 0.03 (+0.000 ± 0.000, detectable 0.000)"
    assert paper.paired_verdict(a, {0: 0.6, 1: 0.6, 5: 0.6}) == "inconclusive (fewer than 3 shared seeds)"


def test_the_detectable_difference_is_twice_the_standard_error_each_verdict_uses(paper):
    # Welch: both sides have variance 0.01 over 3 seeds, so SE = sqrt(0.01/3 + 0.01/3) = 0.08165, detectable 0.1633
    diff, se = paper.welch_difference([0.5, 0.6, 0.7], [0.55, 0.45, 0.65])
    assert diff == pytest.approx(0.05) and paper.detectable(se) == pytest.approx(0.16330, abs=1e-5)
    assert paper.verdict([0.5, 0.6, 0.7], [0.55, 0.45, 0.65]) == "inconclusive (+0.050 ± 0.082, detectable 0.163)"
    # paired: differences 0.020, 0.025, 0.025; mean 0.02333, sd 0.0028868, SE 0.0016667, detectable 0.0033333
    a, b = {0: 0.70, 1: 0.71, 2: 0.745}, {0: 0.68, 1: 0.685, 2: 0.72}
    diff, se = paper.paired_difference(a, b)
    assert diff == pytest.approx(0.0233333, abs=1e-6) and paper.detectable(se) == pytest.approx(0.0033333, abs=1e-6)
    assert paper.paired_verdict(a, b) == "holds (+0.023 ± 0.002, detectable 0.003)"
    assert paper.welch_difference([0.5, 0.6], [0.5, 0.6, 0.7]) is None
    assert paper.paired_difference(a, {0: 0.6, 1: 0.6, 5: 0.6}) is None


def test_an_inconclusive_difference_is_no_effect_only_when_its_interval_is_inside_the_useful_size(paper):
    assert paper.USEFUL_DIFFERENCE == 0.03
    zero = {0: 0.0, 1: 0.0, 2: 0.0}
    # differences 0.00, 0.01, 0.02: +0.010, SE 0.00577, detectable 0.0115; 0.010 + 0.0115 = 0.0215 < 0.03
    assert paper.paired_verdict({0: 0.0, 1: 0.01, 2: 0.02}, zero) == \
        "no effect larger than 0.03 (+0.010 ± 0.006, detectable 0.012)"
    # differences 0.000, 0.015, 0.030: detectable 0.0173 < 0.03 too, but 0.015 + 0.0173 = 0.032 leaves room for more
    assert paper.paired_verdict({0: 0.0, 1: 0.015, 2: 0.03}, zero) == "inconclusive (+0.015 ± 0.009, detectable 0.017)"
    assert paper.paired_verdict(zero, {0: 0.0, 1: 0.01, 2: 0.02}).startswith("no effect larger than 0.03 (-0.010")


def test_bytes_to_beat_reads_the_seed_mean_curve(paper):
    curves = [[[4, 100, 0.60], [8, 200, 0.70]], [[4, 110, 0.64], [8, 210, 0.66]]]  # (round, bytes, accuracy)
    assert paper.bytes_to_beat(curves, 0.61) == (4, 105)  # mean 0.62 at round 4
    assert paper.bytes_to_beat(curves, 0.62) == (8, 205)  # strictly above: 0.62 is not
    assert paper.bytes_to_beat(curves, 0.70) is None
    assert paper.bytes_to_beat([curves[0], curves[1][:1]], 0.5) is None  # seeds evaluated at other rounds


def test_a_task_runs_only_its_own_claims(paper, monkeypatch):
    monkeypatch.setattr(paper.grid, "CLAIMS", {
        "1": (["meerkat"], ["base"], "one"), "2": (["random"], ["base"], "two")})
    monkeypatch.setattr(paper.grid, "TASK_CLAIMS", {"rte": ("1",)})
    seen = []
    monkeypatch.setattr(paper.cells, "fetch", lambda cell, run, pending: seen.append(cell) or _fake_result(cell))
    data = paper.collect(["sst2", "rte"], ["1", "2"], [0, 1, 2], run=False)
    checks = {("sst2", "full_fedzo"), ("rte", "full_fedzo")}  # claim 1's dense check, on validation
    assert {(c.task, c.method) for c in seen} == {("sst2", "meerkat"), ("sst2", "random"), ("rte", "meerkat")} | checks
    assert set(data["tuning_grid"]["rte"]) == {"meerkat"}
    assert "rte" not in paper.report(data, ["sst2", "rte"], ["2"]).split("### Tuning grid")[0]
    rte = paper.Cell("rte", "meerkat", "base", 1e-3, 0, "test").overrides()
    assert rte.index("task.max_length=64") > rte.index("task.max_length=32")  # the later override wins


def _fake_result(cell) -> dict:
    return {"cell": {"seed": cell.seed}, "curve": [], "summary": {
        "final_eval_accuracy": 0.5, "zero_shot_accuracy": 0.5, "bytes_up_per_round": 1,
        "bytes_down_per_round": 1, "wall_seconds": 1.0}}


def test_a_worker_runs_one_cell_per_pass_so_earlier_tasks_go_first(paper, monkeypatch):
    monkeypatch.setattr(paper.grid, "CLAIMS", {"1": (["meerkat"], ["base"], "one")})
    ran = []

    def fake_run(cell, path):
        ran.append(cell.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_fake_result(cell)))
        return _fake_result(cell)

    monkeypatch.setattr(paper.cells, "_run", fake_run)
    held = paper.Cell("sst2", "meerkat", "base", paper.lr_grid("meerkat")[-1], 0, "validation")
    paper.grid.LOCKS.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (paper.grid.LOCKS / f"{held.key}.lock").write_text(str(other.pid))  # another worker tunes sst2
        monkeypatch.setitem(paper.WORKER_PASS, "one_cell", True)
        for _ in range(3):  # sst2's two free grid points, then agnews's first: one cell a pass
            monkeypatch.setitem(paper.WORKER_PASS, "ran", False)
            paper.collect(["sst2", "ag_news"], ["1"], [0, 1, 2], run=True)
        assert [k.split("-lr")[0] for k in ran] == ["validation-sst2-meerkat-base"] * 2 + ["validation-ag_news-meerkat-base"]
        (paper.grid.LOCKS / f"{held.key}.lock").unlink()  # the other worker is gone: sst2 comes first again
        monkeypatch.setitem(paper.WORKER_PASS, "ran", False)
        paper.collect(["sst2", "ag_news"], ["1"], [0, 1, 2], run=True)
        assert ran[-1] == held.key
    finally:
        other.kill()
        other.wait()


def test_tuning_ties_go_to_the_smallest_lr(paper, monkeypatch):
    grid = paper.lr_grid("random")
    monkeypatch.setattr(paper.cells, "fetch", lambda cell, run, pending: {"summary": {"final_eval_accuracy": 0.5}})
    assert paper.tuned_lr("sst2", "random", False, []) == min(grid)


def test_cells_run_on_meerkat_paper_device_under_the_same_key(paper, monkeypatch, capsys):
    cell = paper.Cell("sst2", "meerkat", "drift-T1-iid", 5e-4, 0, "test")
    assert not any(o.startswith("model.device=") for o in cell.overrides())  # the CPU: the config's default
    key = cell.key
    monkeypatch.setattr(paper.grid, "DEVICE", "cuda")
    assert cell.overrides()[-1] == "model.device='cuda'"
    assert cell.key == key  # a cell is the same experiment on any device; its JSON records where it ran
    monkeypatch.setattr(paper.grid, "DEVICE", "banana")  # a bad value: one line from the command line, no run
    monkeypatch.setattr(sys, "argv", ["paper.py", "--report-only"])
    with pytest.raises(SystemExit) as error:
        paper.main()
    assert error.value.code == 2 and "MEERKAT_PAPER_DEVICE" in capsys.readouterr().err


def test_tables_count_cells_per_device_only_when_they_ran_on_more_than_one(paper):
    cpu = {"summary": {}}  # written before devices were recorded: a CPU cell
    assert paper.devices_line([cpu, {"device": "x86_64"}], "x86_64") == ""
    line = paper.devices_line([cpu, {"device": "x86_64"}, {"device": "NVIDIA H200"}], "x86_64")
    assert line.startswith("Cells by device: 1 on NVIDIA H200, 2 on x86_64")
    moved = {"device": "NVIDIA H200", "devices": ["x86_64", "NVIDIA H200"]}  # resumed on the GPU
    assert "1 on x86_64 then NVIDIA H200" in paper.devices_line([cpu, moved], "x86_64")


def test_a_cell_names_every_device_its_run_computed_on(paper):
    from paper_cells import ran_on

    assert ran_on({"device_name": "x86_64"}, "x86_64") == ["x86_64"]
    moved = {"earlier": [{"device_name": "x86_64"}, {"device_name": "x86_64"}, {"unreadable": "..."}]}
    assert ran_on(moved, "NVIDIA H200") == ["x86_64", "NVIDIA H200"]
    assert ran_on([], "x86_64") == ["x86_64"]  # a record of the wrong shape names only the last device


def test_the_paper_grid_is_built_scored_and_chosen_by_the_library_tuner(paper, monkeypatch):
    from meerkat_fl import tune

    # the grid: tune.scale_grid around the grid's centre at the method's density
    centre = {"zo.lr": paper.grid.LR_CENTRE * paper.grid.LR_CENTRE_DENSITY / 1e-4}
    assert paper.lr_grid("meerkat_d1e-4") == tune.scale_grid(centre, (1 / 16, 0.25, 1.0, 4.0), significant=3)["zo.lr"]
    # scored on the split tune scores on
    overrides = paper.Cell("sst2", "meerkat", "base", 5e-4, 0, "validation").overrides()
    assert all(f"{key}={value!r}" in overrides for key, value in tune.VALIDATION.items())
    # chosen by tune.best_index under the paper's tie rule
    grid, calls = paper.lr_grid("meerkat"), []
    accuracy = dict(zip(grid, (0.6, 0.7, 0.7)))
    monkeypatch.setattr(paper.cells, "fetch", lambda cell, run, pending: {"summary": {
        "final_eval_accuracy": accuracy[cell.lr]}})
    real = tune.best_index
    monkeypatch.setattr(tune, "best_index", lambda *args, **kwargs: calls.append((args, kwargs)) or real(*args, **kwargs))
    assert paper.tuned_lr("sst2", "meerkat", False, []) == grid[1]
    assert calls == [(([{"zo.lr": lr} for lr in grid], [0.6, 0.7, 0.7]), {"ties": "smallest"})]


def test_every_cached_tuning_choice_is_rebuilt_unchanged(paper, monkeypatch):
    # the committed cache (benchmarks/results/paper/cells) and paper.json: every grid point's cell is found by
    # name, and the tuner picks the lr each committed table was built with
    monkeypatch.setattr(paper.grid, "CELLS", REPO / "benchmarks" / "results" / "paper" / "cells")
    committed = json.loads((REPO / "benchmarks" / "results" / "paper.json").read_text())
    assert committed["lr_grid"] == {m: paper.lr_grid(m) for m in paper.grid.METHODS}
    checked = 0
    for task, lrs in committed["lrs"].items():
        for method, lr in lrs.items():
            pending: list[str] = []
            assert paper.tuned_lr(task, method, False, pending) == lr, (task, method)
            assert pending == [] and lr is not None, (task, method, pending)
            checked += lr is not None
    assert checked >= 16


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_held_by_a_live_worker_is_respected_and_a_dead_workers_lock_is_taken_over(paper):
    mine = paper._lock("cell")
    assert mine is not None and mine.read_text() == str(os.getpid())
    assert paper._lock("cell") == mine  # our own lock: still ours

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine.write_text(str(other.pid))
        assert paper._lock("cell") is None
    finally:
        other.kill()
        other.wait()
    mine.write_text(str(_dead_pid()))
    assert paper._lock("cell") == mine and mine.read_text() == str(os.getpid())

    mine.write_text("")  # created by a worker that has not written its pid yet: wait...
    assert paper._lock("cell") is None
    old = time.time() - 120
    os.utime(mine, (old, old))  # ...unless it never will
    assert paper._lock("cell") == mine


def test_a_dense_cell_waits_for_the_dense_slot_and_releases_its_own_lock(paper, monkeypatch):
    cell = paper.Cell("sst2", "full_fedzo", "base", 1e-7, 0, "test")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        paper.grid.LOCKS.mkdir(parents=True)
        (paper.grid.LOCKS / "dense.lock").write_text(str(other.pid))
        with pytest.raises(paper.Busy):
            paper.run_cell(cell)
        assert not (paper.grid.LOCKS / f"{cell.key}.lock").exists()  # another worker may take it later
    finally:
        other.kill()
        other.wait()

    ran = []
    monkeypatch.setattr(paper.cells, "_run", lambda c, path: ran.append(c) or {"cell": c.key})
    assert paper.run_cell(cell) == {"cell": cell.key} and ran == [cell]
    assert list(paper.grid.LOCKS.iterdir()) == []  # both the cell's lock and the dense slot are released


def test_the_drift_claim_is_opt_in_spends_equal_steps_and_reports_each_sync_frequency(paper, monkeypatch):
    grid = paper.grid
    assert grid.EXTRA_CLAIMS == ("2d", "2w") and grid.default_claims() == ["1"]  # only when named: --claims 2d
    for setting in grid.DRIFT_SETTINGS:  # equal forward passes per client at every T; the whole test split
        cell = paper.Cell("sst2", "meerkat", setting, 5e-4, 0, "test")
        values = dict(o.split("=", 1) for o in cell.overrides())  # the last value of each key wins, as in config
        assert int(values["fed.local_steps"]) * int(values["fed.rounds"]) == grid.DRIFT_LOCAL_STEPS
        assert values["task.eval_size"] == "872"
    monkeypatch.setattr(grid, "CLAIMS", {"2d": (["meerkat"], grid.DRIFT_SETTINGS, "drift")})

    def fake(cell, run, pending):  # IID at 0.80; each Non-IID cell loses 0.002 per local step between syncs
        t = int(cell.setting.split("-")[1][1:]) if cell.split == "test" else 1
        acc = 0.80 - (0.0 if cell.setting.endswith("iid") else 0.002 * t) + 0.01 * cell.seed
        return {"cell": {"seed": cell.seed}, "curve": [[1, 1e3 * t, acc]], "summary": {
            "final_eval_accuracy": acc, "zero_shot_accuracy": 0.5, "bytes_up_per_round": 1,
            "bytes_down_per_round": 1, "wall_seconds": 1.0}}

    monkeypatch.setattr(paper.cells, "fetch", fake)
    data = paper.collect(["sst2"], ["2d"], [0, 1, 2], run=False)
    assert len(data["results"]) == len(grid.DRIFT_SETTINGS)
    text = paper.report(data, ["sst2"], ["2d"])
    assert "| sst2 | meerkat | 50 | 0.810 ± 0.010 (n=3) | 0.710 ± 0.010 (n=3) | 0.710 ± 0.010 (n=3) | 50,000 |" in text
    assert "- sst2 / meerkat / pathological: T=50 gap minus T=1 gap: " in text
    line = next(x for x in text.splitlines() if x.startswith("- sst2 / meerkat / pathological: T=50"))
    assert "paired by seed: holds (+0.098 ± 0.000" in line  # 0.002 x (50 - 1), identical on every seed


def test_the_weighting_claim_reruns_the_dirichlet_cells_weighted_equally_and_pairs_them_by_seed(paper, monkeypatch):
    grid = paper.grid
    for t in grid.DRIFT_T:  # the 2d Dirichlet cell's overrides, weighting aside: a new name, the same run
        sized = paper.Cell("ag_news", "meerkat", f"drift-T{t}-dirichlet01", 5e-4, 0, "test")
        uniform = paper.Cell("ag_news", "meerkat", f"drift-T{t}-dirichlet01-uniform", 5e-4, 0, "test")
        assert "fed.weighting='uniform'" in uniform.overrides()
        assert [o for o in uniform.overrides() if o != "fed.weighting='uniform'"] == sized.overrides()
        assert uniform.key != sized.key
    spec = importlib.util.spec_from_file_location("paper_grid_unpatched", REPO / "benchmarks" / "paper_grid.py")
    unpatched = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, unpatched)  # its dataclass looks its module up there
    spec.loader.exec_module(unpatched)  # the fixture replaced CLAIMS; the grid's own 2w names 2d's cells too
    claim = unpatched.CLAIMS["2w"]
    assert claim[:2] == (["meerkat"], [*grid.WEIGHTING_SETTINGS, *grid.WEIGHTING_REFERENCE])
    monkeypatch.setattr(grid, "CLAIMS", {"2d": (["meerkat"], grid.DRIFT_SETTINGS, "drift"), "2w": claim})

    def fake(cell, run, pending):  # seed 0 collapses by size at T=50 (0.29) and not uniformly (0.70)
        if cell.split == "test" and cell.setting.endswith("uniform") and cell.seed > 0 and "T50" not in cell.setting:
            pending.append(cell.key)  # seeds 1 and 2 run at T=50 only
            return None
        acc = 0.29 if (cell.seed == 0 and cell.setting == "drift-T50-dirichlet01") else 0.70 + 0.01 * cell.seed
        return {"cell": {"seed": cell.seed}, "curve": [[1, 1e3, acc]], "summary": {
            "final_eval_accuracy": acc, "zero_shot_accuracy": 0.5, "bytes_up_per_round": 1,
            "bytes_down_per_round": 1, "wall_seconds": 1.0}}

    monkeypatch.setattr(paper.cells, "fetch", fake)
    data = paper.collect(["ag_news"], ["2w"], [0, 1, 2], run=False)  # a slice of 2w alone still reads 2d's cells
    text = paper.report(data, ["ag_news"], ["2w"])
    assert "| ag_news | meerkat | 50 | 0 | 0.700 | 0.290 | 0.700 | +0.410 |" in text
    assert "| ag_news | meerkat | 50 | 2 | 0.720 | 0.720 | 0.720 | +0.000 |" in text
    assert "| ag_news | meerkat | 1 | 0 | 0.700 | 0.700 | 0.700 | +0.000 |" in text
    assert not any(line.startswith("| ag_news | meerkat | 1 | 1 |") for line in text.splitlines())  # not run
    assert "T=50, uniform minus by shard size: paired by seed: inconclusive (+0.137 ± 0.137" in text
    assert "T=1, uniform minus by shard size: paired by seed: inconclusive (fewer than 3 shared seeds)" in text
    assert any(k.startswith("test-ag_news-meerkat-drift-T1-dirichlet01-uniform-lr") and k.endswith("-s1")
               for k in data["pending"])  # what was not run is listed, not reported


def test_the_tables_after_a_slice_keep_every_claim_and_add_an_opt_in_claim_once_it_has_cells(paper, monkeypatch):
    import argparse

    grid = paper.grid
    monkeypatch.setitem(grid.CLAIMS, "2d", (["meerkat"], grid.DRIFT_SETTINGS, "drift"))
    bare = argparse.Namespace(tasks=None, claims=None, seeds=None)
    assert paper.report_scope(bare) == (list(grid.TASKS), grid.default_claims(), list(grid.SEEDS))
    # `--claims 2d --tasks sst2 --seeds 0`: the tables still cover the default claims and tasks, 2d added
    sliced = argparse.Namespace(tasks=["sst2"], claims=["2d"], seeds=[0])
    assert paper.report_scope(sliced) == (list(grid.TASKS), [*grid.default_claims(), "2d"], list(grid.SEEDS))
    grid.CELLS.mkdir(parents=True)
    (grid.CELLS / "test-sst2-meerkat-drift-T1-iid-lr0.0005-s0.json").write_text("{}")  # one cached 2d cell
    assert paper.report_scope(bare)[1] == [*grid.default_claims(), "2d"]  # a later plain run reports it too
    assert paper.report_scope(argparse.Namespace(tasks=["rte"], claims=None, seeds=[5]))[::2] == (
        [*grid.TASKS, "rte"], sorted({*grid.SEEDS, 5}))


def test_the_first_order_ceiling_runs_backprop_at_its_own_lr_and_is_reported_beside_not_against(
        paper, monkeypatch, data_dir):
    grid = paper.grid
    assert paper.lr_grid(grid.CEILING) == [7.5e-4, 3e-3, 1.2e-2, 4.8e-2, 0.192]  # its own centre, not a ZO lr / density
    cell = paper.Cell("sst2", grid.CEILING, "base", 1.2e-2, 0, "test")
    values = dict(o.split("=", 1) for o in cell.overrides())
    assert values["fo.lr"] == "0.012" and "zo.lr" not in values and values["fed.strategy"] == "'fedavg_fo'"
    monkeypatch.setenv("MEERKAT_DATA_DIR", data_dir)  # one real cell on the tiny model: a first-order run
    result = paper.cells.run_cell(cell)
    config = (grid.RUNS / cell.key / "config.toml").read_text()
    assert "fedavg_fo" in config and "lr = 0.012" in config
    summary = result["summary"]
    assert summary["method"] == grid.CEILING and summary["mask_kind"] == "sensitive"
    assert summary["bytes_up_per_round"] > 4 * summary["trainable_values"]  # masked deltas up, not scalars

    monkeypatch.setattr(grid, "CLAIMS", {"1": (["meerkat", "random", grid.CEILING], ["base"], "tiny claim")})

    def fake(cell, run, pending):  # Meerkat 0.70, random 0.60, the ceiling 0.80 (+0.01 per seed each)
        acc = {"random": 0.60, grid.CEILING: 0.80}.get(cell.method, 0.70) + 0.01 * cell.seed
        return {"cell": {"seed": cell.seed}, "curve": [[1, 1e3, acc]], "summary": {
            "final_eval_accuracy": acc, "zero_shot_accuracy": 0.5, "bytes_up_per_round": 1,
            "bytes_down_per_round": 1, "wall_seconds": 1.0}}

    monkeypatch.setattr(paper.cells, "fetch", fake)
    text = paper.report(paper.collect(["sst2"], ["1"], [0, 1, 2], run=False), ["sst2"], ["1"])
    assert "| task | meerkat | random | fedavg_fo |" in text and "| 0.810 ± 0.010 (n=3) |" in text
    assert f"meerkat vs {grid.CEILING}:" not in text  # not a competitor the claim must beat
    line = next(x for x in text.splitlines() if "first-order ceiling" in x)  # a gap, with no verdict word
    assert line == ("- sst2: meerkat minus the first-order ceiling (fedavg_fo): -0.100 ± 0.008 (Welch), "
                    "-0.100 ± 0.000 (paired by seed)")
    monkeypatch.setattr(paper.cells, "fetch", lambda cell, run, pending: None if cell.method == grid.CEILING
                        else fake(cell, run, pending))  # no ceiling cell yet: no ceiling line
    text = paper.report(paper.collect(["sst2"], ["1"], [0, 1, 2], run=False), ["sst2"], ["1"])
    assert "first-order ceiling" not in text and "meerkat vs random" in text


def test_the_drift_claim_reports_gradip_decay_within_a_round_and_how_well_it_separates_one_label_clients(paper):
    import numpy as np

    grid = paper.grid
    grid.CELLS.mkdir(parents=True)
    steps = np.arange(50)
    shapes = {"iid": lambda c: 10.0 + (-1) ** steps * (c + 1),  # oscillates at a steady level
              "pathological": lambda c: 30.0 * np.exp(-steps / (10 + c))}  # settles, as a fitted label does
    results = {}
    for skew, shape in shapes.items():
        for seed in (0, 1):
            cell = paper.Cell("sst2", "meerkat", f"drift-T50-{skew}", 5e-4, seed, "test")
            records = [{"round": r, "client_id": c, "gradip": list(shape(c) * (-1) ** (steps // 3))}
                       for r in (1, 2) for c in range(3)]
            (grid.CELLS / f"{cell.key}.json").write_text(json.dumps({"gradip": records}))
        results[f"sst2/meerkat/drift-T50-{skew}"] = {"seeds": [0, 1]}
    steps10 = np.arange(10)
    ten = {"iid": 1.0 + 9.0 * ((steps10 >= 2) & (steps10 < 4)),  # loud only just after the early fifth: no decay
           "pathological": 1.0 + 9.0 * (steps10 < 2)}  # loud only in the early fifth [0, 2): decays 10x, flagged
    for skew, values in ten.items():
        cell = paper.Cell("sst2", "meerkat", f"drift-T10-{skew}", 5e-4, 0, "test")
        records = [{"round": 1, "client_id": 0, "gradip": list(values)},
                   {"round": 2, "client_id": 0, "gradip": list(values[:7])},  # cut short: left out
                   {"round": 3, "client_id": 0, "gradip": [float("nan"), *values[1:]]},  # not finite: left out
                   {"round": 4, "client_id": 0, "gradip": [0.0] * 10}]  # no ratio to take: left out
        (grid.CELLS / f"{cell.key}.json").write_text(json.dumps({"gradip": records}))
        results[f"sst2/meerkat/drift-T10-{skew}"] = {"seeds": [0, 1]}  # seed 1 has no cached cell
    data = {"lrs": {"sst2": {"meerkat": 5e-4}}, "results": results}
    at10 = paper.drift_gradip(data, ["sst2"])["sst2/T10"]
    assert at10["iid"]["client_rounds"] == at10["pathological"]["client_rounds"] == 1
    assert at10["iid"]["seeds"] == [0] and at10["iid"]["median_decay"] == 1.0 and at10["iid"]["flagged"] == 0.0
    assert at10["pathological"]["median_decay"] == 10.0 and at10["pathological"]["flagged"] == 1.0
    summary = paper.drift_gradip(data, ["sst2"])["sst2/T50"]
    assert summary["iid"]["client_rounds"] == summary["pathological"]["client_rounds"] == 12
    assert summary["iid"]["decayed_2x"] == 0.0 and summary["iid"]["flagged"] == 0.0
    assert summary["pathological"]["decayed_2x"] == 1.0 and summary["pathological"]["flagged"] == 1.0
    assert summary["pathological"]["median_decay"] > 10 and summary["pathological"]["auc_vs_iid"] == 1.0
    assert paper.auc([1.0, 2.0], [2.0, 3.0]) == 0.125  # one tie (half) of four pairs
    lines = paper.drift_gradip_lines({"sst2/T50": summary})
    assert "| sst2 | 50 | pathological | 0,1 | 12 |" in "\n".join(lines) and lines[-2].endswith("| 1.00 |")
