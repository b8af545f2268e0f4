"""Every run folder records its environment: environment.json and summary.json["environment"]."""

from __future__ import annotations

import json
import platform

import torch

from meerkat_fl import environment
from meerkat_fl.config import Config
from meerkat_fl.rundir import RunDir


def test_environment_names_versions_device_dtype_and_threads():
    record = environment.environment("cpu", "bf16")
    versions = record["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == environment.package_version("torch")
    assert set(environment.PACKAGES) <= set(versions)
    assert record["device"] == "cpu" and record["dtype"] == "bf16"
    assert record["torch_threads"] == torch.get_num_threads()


def test_missing_package_has_no_version():
    assert environment.package_version("no-such-distribution-meerkat") is None


def test_run_folder_and_summary_carry_the_environment(tmp_path):
    cfg = Config()
    cfg.model.dtype = "fp16"
    run = RunDir.create(tmp_path / "run", cfg)
    written = json.loads((run.path / "environment.json").read_text())
    assert written["dtype"] == "fp16" and written["versions"]["transformers"]
    run.write_summary({"final_eval_accuracy": 0.5}, "cpu", "fp16")
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["final_eval_accuracy"] == 0.5
    assert summary["environment"]["versions"] == written["versions"]


def test_a_resumed_run_keeps_the_environments_it_started_in(tmp_path):
    from meerkat_fl import run as shell

    cfg = Config()
    cfg.model.dtype = "fp16"
    first = RunDir.create(tmp_path / "run", cfg)
    started = json.loads((first.path / "environment.json").read_text())
    cfg.model.dtype = "float32"  # resumed elsewhere: another dtype stands in for another device
    run = shell.open_run(first.path, cfg, resume=True)
    assert json.loads((first.path / "environment.json").read_text()) == started  # nothing loaded, nothing computed
    shell.begin(run, resumed_round=None, evaluate=None, environment=("cpu", "float32"))  # no checkpoint: clean start
    assert json.loads((first.path / "environment.json").read_text()) == started
    shell.begin(run, resumed_round=3, evaluate=None, environment=("cpu", "float32"))  # its checkpoint loaded
    resumed = json.loads((first.path / "environment.json").read_text())
    assert resumed["dtype"] == "float32" and resumed["earlier"] == [started]
    first.write_summary({}, "cpu", "float32")  # the same environment again: nothing new to keep
    summary = json.loads((first.path / "summary.json").read_text())
    assert summary["environment"]["earlier"] == [started]
    fresh = RunDir.create(tmp_path / "other", Config())  # a new run has no earlier starts
    assert "earlier" not in json.loads((fresh.path / "environment.json").read_text())


def test_a_damaged_environment_record_does_not_stop_a_resume(tmp_path):
    run = RunDir.create(tmp_path / "run", Config())
    (run.path / "environment.json").write_text("{not json")
    record = run.record_environment("cpu", "float32")
    assert record["earlier"][0]["unreadable"].endswith("the file is damaged")
    (run.path / "environment.json").write_text(json.dumps({"device": "cpu", "earlier": 7}))
    assert "earlier" in run.record_environment("cpu", "float32")["earlier"][0]["unreadable"]
