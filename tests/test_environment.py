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
