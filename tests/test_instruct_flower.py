"""A generation task on Flower: the same global values and metrics (loss, ROUGE-L) as the in-process simulator.
One test (Flower tests are slow); the machinery is tested in test_flower."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower tests need the [flower] extra: pip install -e '.[flower]'")

from test_flower import RUN_TIMEOUT, quiet_flower, rows, small, values  # noqa: F401  (quiet_flower: autouse)

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.flower.launch import run_simulation

pytestmark = pytest.mark.flower


def test_flower_trains_a_generation_task_like_the_simulator(tiny_cfg, tmp_path):
    cfg = config.validate(small(tiny_cfg, "task.name=synthetic_instruct", "task.train_size=40", "task.eval_size=4",
                                "task.max_new_tokens=3", "task.max_length=40", "fed.partition=pathological",
                                "task.template=alpaca"))
    simulate(cfg, tmp_path / "inproc", progress=False)
    summary = run_simulation(cfg, tmp_path / "flower", tmp_path / "work", timeout=RUN_TIMEOUT)
    assert torch.equal(values(tmp_path / "flower"), values(tmp_path / "inproc"))
    for ours, theirs in zip(rows(tmp_path / "flower"), rows(tmp_path / "inproc"), strict=True):
        for key in ("train_loss", "bytes_up", "clients", "eval/loss", "eval/rouge_l"):
            assert ours[key] == theirs[key], key
    assert summary["primary_metric"] == "rouge_l" and summary["task_loss"] == "response"
