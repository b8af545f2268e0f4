"""The first-order upper bound (fedavg_fo) on the tiny model: backprop on the masked coordinates, masked
deltas up, the server's weighted mean of endpoints, bytes, hostile replies, resume."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from meerkat_fl import config
from meerkat_fl.errors import ConfigError, MessageRejected
from meerkat_fl.fed.messages import ClientUpdate, decode_plan, decode_update, encode_plan, encode_update
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.transport import InProcessTransport
from meerkat_fl.local import DataPointer, local_train_fo, masked_gradient

FO = ["method='fedavg_fo'", "fo.lr=5.0", "fed.rounds=2"]  # the tiny random model's 736 coordinates learn slowly


@pytest.fixture()
def fo_cfg(tiny_cfg):
    return config.validate(config.apply_overrides(tiny_cfg, FO))


def one_round(fed, transport=None):
    transport = transport or InProcessTransport(fed.clients, fed.runtime)
    plans, encoded = fed.server.configure_round()
    replies = transport.send_and_receive(encoded)
    return plans, replies, fed.server.aggregate_round(plans, encoded, replies)


def fixed_loss(fed, values) -> float:
    """The task loss at ``values`` on the first 64 training examples (the same rows before and after)."""
    fed.params.write(values)
    return fed.data.scorer.loss(fed.runtime.train.batch(np.arange(64), fed.params.device))


def test_masked_gradient_is_the_full_gradient_at_the_masked_entries(fo_cfg):
    fed = build_federation(fo_cfg)
    params, batch = fed.params, fed.runtime.train.batch(np.arange(8))
    loss, grad = masked_gradient(params, lambda: fed.data.scorer.loss_tensor(batch))
    for tensor in params.tensors:
        tensor.requires_grad_(True)
    try:
        full = torch.autograd.grad(fed.data.scorer.loss_tensor(batch), params.tensors)
    finally:
        for tensor in params.tensors:
            tensor.requires_grad_(False)
    expected = torch.cat([g.reshape(-1) if idx is None else g.reshape(-1)[idx] for g, idx in zip(full, params.indices)])
    assert torch.equal(grad, expected) and grad.abs().sum() > 0
    assert loss == pytest.approx(fed.data.scorer.loss(batch), rel=1e-6)
    assert not any(t.requires_grad for t in fed.runtime.scorer.model.parameters())  # left frozen, as loaded


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_first_order_steps_change_only_the_masked_coordinates(fo_cfg, optimizer):
    fed = build_federation(fo_cfg)
    model = fed.runtime.scorer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = fed.params.gather()
    start = values.clone()
    steps = local_train_fo(fed.params, values, 3, lr=0.1, optimizer=optimizer,
                           batch_loss=lambda rows: fed.data.scorer.loss_tensor(fed.runtime.train.batch(rows)),
                           pointer=DataPointer(len(fed.runtime.train), seed=1), batch_size=4)
    assert len(steps) == 3 and not any(s.skipped for s in steps)
    assert torch.equal(fed.params.gather(), values) and not torch.equal(values, start)
    fed.params.write(start)  # restoring the masked coordinates restores the whole model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_two_round_run_lowers_the_loss_and_the_server_averages_the_endpoints(fo_cfg):
    fed = build_federation(fo_cfg)
    start = fed.server.values.clone()
    losses = [fixed_loss(fed, start)]
    for _ in range(2):
        round_start = fed.server.values.clone()
        plans, replies, result = one_round(fed)
        assert sorted(result.accepted) == sorted(plans) and not result.rejected
        # recomputed from the wire: p_k = n_k / sum n, endpoint_k = start + delta_k, in float64
        sizes = {cid: fed.clients[cid].num_examples for cid in result.accepted}
        deltas = {cid: decode_update(replies[cid]).values.astype(np.float64) for cid in result.accepted}
        by_hand = sum(sizes[c] * (round_start.double().numpy() + deltas[c]) for c in sizes) / sum(sizes.values())
        np.testing.assert_allclose(fed.server.values.double().numpy(), by_hand, rtol=0, atol=1e-6)
        losses.append(fixed_loss(fed, fed.server.values))
    assert losses[0] > losses[1] > losses[2] and losses[0] - losses[2] > 0.005  # measured: 0.6847 -> 0.6735


def test_a_clients_endpoint_is_what_it_trained(fo_cfg):
    fed = build_federation(fo_cfg)
    plans, _ = fed.server.configure_round()
    cid, plan = next(iter(plans.items()))
    assert plan.estimator == "fo" and plan.optimizer == "sgd" and plan.lr == 5.0
    update = fed.clients[cid].fit(decode_plan(encode_plan(plan)), fed.runtime)
    trained = fed.params.gather()
    assert update.scalars.size == 0 and update.losses.size == plan.seeds.size
    torch.testing.assert_close(fed.server.values + torch.from_numpy(update.values.copy()), trained, rtol=0, atol=1e-7)


def test_bytes_up_are_the_masked_delta_plus_the_zeroth_order_reply(fo_cfg):
    fed = build_federation(fo_cfg)
    _, replies, result = one_round(fed)
    size = fed.params.size
    for cid in result.accepted:
        update = decode_update(replies[cid])
        assert result.bytes_up[cid] == len(replies[cid])
        without = len(encode_update(replace(update, values=None)))
        spec = len(json.dumps(["values", "float32", size], separators=(",", ":"))) + 1  # its header entry
        assert result.bytes_up[cid] - without == 4 * size + spec


def _values(reply, values):
    return encode_update(replace(decode_update(reply), values=np.asarray(values, np.float32)))


@pytest.mark.parametrize("how,reason", [
    (lambda r, n: _values(r, np.zeros(n - 1)), "values for"),
    (lambda r, n: _values(r, np.full(n, np.nan)), "non-finite value"),
    (lambda r, n: _values(r, np.r_[np.zeros(n - 1), np.inf]), "non-finite value"),
    (lambda r, n: encode_update(replace(decode_update(r), values=None)), "carries values and no scalars"),
    (lambda r, n: encode_update(replace(decode_update(r), scalars=np.ones(2, np.float32))), "no scalars"),
])
def test_a_hostile_first_order_reply_is_rejected_and_the_others_still_aggregate(fo_cfg, how, reason):
    fed, honest = build_federation(fo_cfg), build_federation(fo_cfg)
    size = fed.params.size

    class Tamper(InProcessTransport):
        def send_and_receive(self, plans):
            replies = super().send_and_receive(plans)
            replies[0] = how(replies[0], size)
            return replies

    _, _, result = one_round(fed, Tamper(fed.clients, fed.runtime))
    assert reason in result.rejected[0] and 0 not in result.accepted and fed.server.rejected_total == 1
    _, replies, _ = one_round(honest)
    others = [c for c in result.accepted]
    sizes = {c: fed.clients[c].num_examples for c in others}
    start = fed.runtime.initial_values.double().numpy()
    by_hand = sum(sizes[c] * (start + decode_update(replies[c]).values) for c in others) / sum(sizes.values())
    np.testing.assert_allclose(fed.server.values.double().numpy(), by_hand, rtol=0, atol=1e-6)


def test_a_zeroth_order_reply_must_not_carry_values(tiny_cfg):
    fed = build_federation(tiny_cfg)

    class Tamper(InProcessTransport):
        def send_and_receive(self, plans):
            replies = super().send_and_receive(plans)
            replies[0] = _values(replies[0], np.zeros(fed.params.size))
            return replies

    _, _, result = one_round(fed, Tamper(fed.clients, fed.runtime))
    assert "carries scalars, not values" in result.rejected[0]


def test_a_plan_with_an_unknown_estimator_or_optimizer_is_rejected(fo_cfg):
    fed = build_federation(fo_cfg)
    plans, _ = fed.server.configure_round()
    plan = next(iter(plans.values()))
    data = encode_plan(replace(plan, estimator="so"))
    with pytest.raises(MessageRejected, match="unknown estimator 'so'"):
        decode_plan(data)
    with pytest.raises(MessageRejected, match="unknown optimizer 'rmsprop'"):
        fed.clients[plan.client_id].fit(decode_plan(encode_plan(replace(plan, optimizer="rmsprop"))), fed.runtime)


def test_resume_is_bit_identical(tiny_cfg, tmp_path, assert_same_run):
    cfg = config.validate(config.apply_overrides(tiny_cfg, [*FO, "fed.rounds=3", "fo.optimizer=adam", "fo.lr=1e-2"]))
    full = simulate(cfg, tmp_path / "full", progress=False)
    assert simulate(cfg, tmp_path / "cut", progress=False, stop_after=2) == {"interrupted_at_round": 2}
    resumed = simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert resumed["final/accuracy"] == full["final/accuracy"] and full["method"] == "fedavg_fo"


@pytest.mark.parametrize("flags", [["method='fedavg_fo'", "fed.downlink=scalars"],
                                   ["fed.strategy=fedavg_fo", "fed.downlink=scalars"]])
def test_a_downlink_other_than_values_is_a_config_error_that_says_why(flags):
    with pytest.raises(ConfigError, match=r"'fedavg_fo' supports fed.downlink in \['values'\], got 'scalars' "
                                          r"\(a first-order path cannot be replayed"):
        config.load(None, flags)


def test_an_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="fo.optimizer: must be one of sgd, adam"):
        config.load(None, ["method='fedavg_fo'", "fo.optimizer=rmsprop"])


def test_a_reply_without_values_still_decodes_as_before():
    update = ClientUpdate(0, 1, np.ones(2, np.float32), np.ones(2, np.float32), 5)
    assert decode_update(encode_update(update)).values is None


def test_meerkat_run_method_fedavg_fo_from_the_command_line(tmp_path):  # the synthetic task: no data files
    from pathlib import Path

    from meerkat_fl import cli

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    assert cli.main(["run", str(tiny), "--method", "fedavg_fo", "--set", "fed.rounds=1", "--quiet",
                     "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "fedavg_fo" and summary["bytes_up_per_round"] > 4 * summary["trainable_values"] * summary["num_clients"]


def test_a_zeroth_order_plan_keeps_its_bytes(tiny_cfg):
    fed = build_federation(tiny_cfg)
    plan = next(iter(fed.server.configure_round()[0].values()))
    assert plan.estimator == "zo" and b"estimator" not in encode_plan(plan)
    assert decode_plan(encode_plan(plan)).estimator == "zo"


def test_tune_sweeps_the_first_order_lr():
    from meerkat_fl.tune import default_center

    assert default_center(config.load(None, ["method='fedavg_fo'"])) == {"fo.lr": config.FOConfig().lr}
    assert default_center(config.load(None, ["method='fedavg_fo'", "fo.lr=1e-2"])) == {"fo.lr": 1e-2}
