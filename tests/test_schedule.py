"""The lr schedule: its factors, its config checks, and that federated and centralised runs apply it exactly
(plans, paths, client replay and resume all see the scheduled lr)."""

import itertools
import json
import math

import pytest
import torch

from meerkat_fl import config
from meerkat_fl import finetune as finetune_module
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.aggregate import aggregate_paths
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.transport import InProcessTransport
from meerkat_fl.finetune import finetune
from meerkat_fl.schedule import LRSchedule


def one_round(fed):
    plans, encoded = fed.server.configure_round()
    replies = InProcessTransport(fed.clients, fed.runtime).send_and_receive(encoded)
    return plans, fed.server.aggregate_round(plans, encoded, replies)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_factors_follow_their_formulas():
    assert [LRSchedule().factor(i, 10) for i in range(12)] == [1.0] * 12
    linear = LRSchedule("linear")
    assert [linear.factor(i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert LRSchedule("linear", final=0.1).factor(2, 4) == pytest.approx(0.1 + 0.9 * 0.5)
    cosine = [LRSchedule("cosine").factor(i, 8) for i in range(8)]
    assert cosine[0] == 1.0 and cosine[4] == pytest.approx(0.5)
    assert all(a > b > 0 for a, b in itertools.pairwise(cosine))
    assert LRSchedule("cosine", final=0.2).factor(6, 8) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 0.75)) / 2)
    warm = LRSchedule("linear", warmup=2)  # 1/3, 2/3, then the decay over the 4 units after the warm-up
    assert [warm.factor(i, 6) for i in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert LRSchedule("constant", warmup=1).factor(0, 5) == 0.5 and LRSchedule("constant", warmup=1).factor(1, 5) == 1.0
    assert linear.factor(7, 4) == 0.0  # past the planned end: the final lr, never negative
    assert LRSchedule("linear").lr(0.3, 0, 4) == 0.3 and LRSchedule().lr(0.3, 9, 4) == 0.3


@pytest.mark.parametrize("override, message", [
    ("lr_schedule.kind='step'", "lr_schedule.kind: must be one of constant, linear, cosine"),
    ("lr_schedule.final=1.5", "lr_schedule.final: must be in"),
    ("lr_schedule.final=-0.1", "lr_schedule.final: must be >= 0"),
    ("lr_schedule.warmup=-1", "lr_schedule.warmup: must be >= 0"),
])
def test_a_bad_schedule_is_a_config_error_naming_the_key(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        config.validate(config.apply_overrides(tiny_cfg, [override]))


def test_the_schedule_scales_each_rounds_plans_and_client_replay_stays_exact(tiny_cfg):
    base = ["fed.rounds=4", "fed.strategy=fedmezo", "fed.downlink=scalars"]  # a personalised lr, scaled too
    constant = build_federation(config.apply_overrides(tiny_cfg, base))
    cosine = build_federation(config.apply_overrides(tiny_cfg, [*base, "lr_schedule.kind='cosine'"]))
    schedule = LRSchedule("cosine")
    for round_index in range(4):
        unscaled = cosine.server.strategy.configure(round_index, cosine.server.sample(round_index),
                                                    cosine.server.instructions())  # FedMeZO's personalised lrs
        one_round(constant)
        plans_s, result = one_round(cosine)
        factor = schedule.factor(round_index, 4)
        if round_index:  # personalised from round 1 on: the schedule scales each client's own lr
            assert len({t.lr for t in unscaled.values()}) > 1
        for cid, told in unscaled.items():
            assert plans_s[cid].lr == told.lr * factor
        assert {p.lr for p in result.paths} == {plans_s[p.client_id].lr for p in result.paths}
        assert result.metrics["lr_factor"] == factor
        if round_index == 0:  # factor 1: the same round as the constant run's, bit for bit
            assert torch.equal(constant.server.values, cosine.server.values)
    assert not torch.equal(constant.server.values, cosine.server.values)
    # each client has replayed rounds 0..2 from the scalars downlink with the scheduled lrs: round 3 reaches the server
    last = cosine.server.link.history[3]
    for client in cosine.clients.values():
        assert client.synced_round == 2
        assert torch.equal(aggregate_paths(client.values, cosine.params.mask, last, noise=cosine.params.noise),
                           cosine.server.values)


def test_a_scheduled_run_resumes_to_the_uninterrupted_result_and_refuses_to_be_extended(
        tiny_cfg, tmp_path, assert_same_run):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=4", "fed.downlink=scalars", "lr_schedule.kind='linear'",
                                            "lr_schedule.warmup=1"])
    simulate(cfg, tmp_path / "full", progress=False)
    assert simulate(cfg, tmp_path / "cut", progress=False, stop_after=2) == {"interrupted_at_round": 2}
    simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    factors = [row["lr_factor"] for row in metrics(tmp_path / "full") if "lr_factor" in row]
    assert factors == pytest.approx([0.5, 1.0, 2 / 3, 1 / 3])
    assert simulate(cfg, tmp_path / "short", progress=False, stop_after=2) == {"interrupted_at_round": 2}
    with pytest.raises(ConfigError, match="fed.rounds changed .* lr_schedule.kind=linear"):
        simulate(config.apply_overrides(cfg, ["fed.rounds=6"]), tmp_path / "short", progress=False, resume=True)
    # train.steps does not set a federated run's length: changing it is not refused
    simulate(config.apply_overrides(cfg, ["train.steps=7"]), tmp_path / "short", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "short")


@pytest.mark.parametrize("command", ["run", "finetune"])
def test_a_warmup_as_long_as_the_run_is_a_config_error(tiny_cfg, tmp_path, command):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=3", "train.steps=3", "lr_schedule.warmup=3"])
    with pytest.raises(ConfigError, match=r"lr_schedule.warmup = 3 must be shorter than the run \((fed.rounds|train.steps) = 3\)"):
        (simulate if command == "run" else finetune)(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # refused before a run folder is made: the fixed config can use it


def test_finetune_applies_the_schedule_per_step_and_resumes_exactly(tiny_cfg, tmp_path, assert_same_run, monkeypatch):
    cfg = config.apply_overrides(tiny_cfg, ["train.steps=6", "train.eval_every=2", "lr_schedule.kind='cosine'",
                                            "lr_schedule.final=0.1"])
    finetune(cfg, tmp_path / "full", progress=False)
    rows = [r for r in metrics(tmp_path / "full") if "lr" in r]
    schedule = LRSchedule("cosine", final=0.1)
    assert [r["lr"] for r in rows] == [cfg.zo.lr * schedule.factor(i, 6) for i in range(6)]
    constant = config.apply_overrides(cfg, ["lr_schedule.kind='constant'"])
    finetune(constant, tmp_path / "constant", progress=False)
    assert all("lr" not in r for r in metrics(tmp_path / "constant"))  # a constant run's metrics are unchanged
    from meerkat_fl.patch import load_patch

    assert not torch.equal(load_patch(tmp_path / "full" / "patch.safetensors").values,
                           load_patch(tmp_path / "constant" / "patch.safetensors").values)

    calls = {"n": 0}
    real = finetune_module.local_train

    def killed_at_step_5(*args, **kwargs):  # a kill after the step-4 checkpoint
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "local_train", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(finetune_module, "local_train", real)
    finetune(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    with pytest.raises(ConfigError, match="train.steps changed .* lr_schedule.kind=cosine"):
        finetune(config.apply_overrides(cfg, ["train.steps=8"]), tmp_path / "cut", progress=False, resume=True)


def test_the_first_order_bound_is_scheduled_too(tiny_cfg):
    """The schedule scales whatever lr the strategy tells (here fo.lr), not zo.lr alone."""
    cfg = config.apply_overrides(tiny_cfg, ["method=fedavg_fo", "fed.rounds=5", "lr_schedule.kind='linear'"])
    fed = build_federation(config.validate(cfg))
    for round_index in range(5):
        plan = fed.server.plan_for(0, round_index)
        assert plan.estimator == "fo" and plan.lr == cfg.fo.lr * (1 - round_index / 5)
