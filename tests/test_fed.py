"""Federated rounds on the tiny model: replay, aggregation, downlinks, bytes, rejection, resume."""

import json

import numpy as np
import pytest
import torch

from meerkat_fl import config
from meerkat_fl.fed.aggregate import aggregate_paths, client_endpoint, normalised_weights
from meerkat_fl.fed.messages import (
    ClientUpdate,
    decode_update,
    encode_plan,
    encode_update,
)
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.strategies import heterogeneity_index, personalised_lrs
from meerkat_fl.fed.transport import InProcessTransport
from meerkat_fl.patch import load_patch


def one_round(fed, transport=None):
    transport = transport or InProcessTransport(fed.clients, fed.runtime)
    plans, encoded = fed.server.configure_round()
    replies = transport.send_and_receive(encoded)
    return plans, encoded, replies, fed.server.aggregate_round(plans, encoded, replies)


GENERATORS = pytest.mark.parametrize("generator", ["torch_cpu", "philox"])  # the exactness tests run with both


@GENERATORS
def test_server_replay_equals_the_clients_own_trained_values_bit_for_bit(tiny_cfg, generator):
    fed = build_federation(config.apply_overrides(tiny_cfg, [f"zo.noise_generator={generator}"]))
    start = fed.server.values.clone()
    plans, _, _ = fed.server.configure_round()[0], None, None
    for cid, plan in plans.items():
        update = fed.clients[cid].fit(plan, fed.runtime)
        trained = fed.params.gather()  # the shared model holds what the client trained
        from meerkat_fl.fed.messages import ClientPath

        path = ClientPath(0, cid, 1.0, plan.lr, plan.seeds, update.scalars)
        assert torch.equal(client_endpoint(start, fed.params.mask, path, noise=fed.params.noise), trained)
        assert not torch.equal(trained, start)


def test_aggregation_equals_the_hand_computed_weighted_mean(tiny_cfg):
    fed = build_federation(tiny_cfg)
    start = fed.server.values.clone()
    _, _, _, result = one_round(fed)
    sizes = {cid: fed.clients[cid].num_examples for cid in result.accepted}
    endpoints = {p.client_id: client_endpoint(start, fed.params.mask, p, noise=fed.params.noise).double().numpy() for p in result.paths}
    by_hand = sum(sizes[c] * endpoints[c] for c in sizes) / sum(sizes.values())
    np.testing.assert_allclose(fed.server.values.double().numpy(), by_hand, rtol=0, atol=1e-6)
    assert not torch.equal(fed.server.values, start)


def test_uniform_weighting():
    assert normalised_weights({0: 10, 1: 30}, "uniform") == {0: 0.5, 1: 0.5}
    assert normalised_weights({0: 10, 1: 30}, "data_size") == {0: 0.25, 1: 0.75}


def test_both_downlink_modes_reach_the_same_global_model(tiny_cfg, tmp_path):
    tiny_cfg.run.eval_every = 0
    values = simulate(tiny_cfg, tmp_path / "v", progress=False)
    scalars_cfg = config.apply_overrides(tiny_cfg, ["fed.downlink=scalars"])
    scalars = simulate(scalars_cfg, tmp_path / "s", progress=False)
    a, b = load_patch(tmp_path / "v" / "patch.safetensors"), load_patch(tmp_path / "s" / "patch.safetensors")
    assert torch.equal(a.values, b.values)
    assert scalars["bytes_down_per_round"] < values["bytes_down_per_round"]


@GENERATORS
def test_clients_replaying_scalars_hold_the_servers_model(tiny_cfg, generator):
    cfg = config.apply_overrides(tiny_cfg, ["fed.downlink=scalars", f"zo.noise_generator={generator}"])
    fed = build_federation(cfg)
    for _ in range(3):
        before = fed.server.values.clone()
        one_round(fed)
    # after round 3 each client has replayed rounds 0..1; replaying round 2 gives the server's values
    last = [p for p in fed.server.link.history[2]]
    for client in fed.clients.values():
        assert client.synced_round == 1
        assert torch.equal(aggregate_paths(client.values, fed.params.mask, last, noise=fed.params.noise), fed.server.values)
    assert not torch.equal(before, fed.server.values)


def test_byte_counts_equal_the_serialised_message_lengths(tiny_cfg):
    fed = build_federation(tiny_cfg)
    plans, encoded, replies, result = one_round(fed)
    for cid in plans:
        assert result.bytes_down[cid] == len(encode_plan(plans[cid])) == len(encoded[cid])
        assert result.bytes_up[cid] == len(replies[cid]) == len(encode_update(decode_update(replies[cid])))
    # scalar communication: the uplink carries T float32 scalars (+ T losses) and a small header
    T = tiny_cfg.fed.local_steps
    assert all(n < 200 + 8 * T for n in result.bytes_up.values())
    assert all(n > 4 * fed.params.size for n in result.bytes_down.values())


def test_message_round_trip():
    update = ClientUpdate(3, 1, np.array([0.5, -1.25], np.float32), np.array([0.7, 0.6], np.float32), 17,
                          {"skipped_steps": 0.0})
    back = decode_update(encode_update(update))
    assert back.round == 3 and back.client_id == 1 and back.num_examples == 17
    assert np.array_equal(back.scalars, update.scalars)


@pytest.mark.parametrize("n", [3, 7])
def test_fedmezo_personalised_lr_formula(n):
    rng = np.random.default_rng(n)
    signals = {k: float(v) for k, v in enumerate(rng.uniform(0, 5, size=n))}
    lrs = personalised_lrs(1e-3, 5e-6, signals)
    mean = np.mean(list(signals.values()))
    spread = max(abs(d - mean) for d in signals.values())
    for k, d in signals.items():
        assert lrs[k] == pytest.approx(1e-3 + 5e-6 * (d - mean) / spread, rel=1e-12)
    phi = heterogeneity_index(signals)
    assert max(abs(v) for v in phi.values()) == pytest.approx(1.0)
    assert sum(phi.values()) == pytest.approx(0.0, abs=1e-12)


def test_fedmezo_runs_and_personalises(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, ["fed.strategy=fedmezo", "fedmezo.lr_scale=1e-3"])
    simulate(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = rows[-1]["fedmezo_lr"]
    assert len(set(lrs.values())) > 1 and all(v >= 0 for v in lrs.values())


@pytest.mark.parametrize("restart", [False, True])
def test_scalars_client_rejoins_after_a_lost_reply_or_a_restart(tiny_cfg, restart):
    # A client whose reply is lost (or whose node restarts and forgets its replayed model) rejoins: the
    # server sends it the whole history from round 0, and it rebuilds the server's model bit for bit.
    from meerkat_fl.fed.client import Client

    cfg = config.apply_overrides(tiny_cfg, ["fed.downlink=scalars", "fed.sample_fraction=1.0"])
    fed = build_federation(cfg)
    victim = 1
    one_round(fed)
    one_round(fed, Tamper(InProcessTransport(fed.clients, fed.runtime), victim, lambda r: None))
    assert fed.server.link.client_synced[victim] == -1 and 0 in fed.server.link.history  # history kept from round 0
    if restart:
        old = fed.clients[victim]
        fed.clients[victim] = Client(victim, old.indices, cfg.run.seed)
        fed.clients[victim].pointer.load_state(old.pointer.state())
    plans, _, _, result = one_round(fed)
    assert victim in result.accepted and plans[victim].synced_round == -1
    assert sorted({p.round for p in plans[victim].paths}) == [0, 1]
    one_round(fed)  # everyone is in step again: the history since round 0 is dropped
    assert min(fed.server.link.history) == 3
    last = fed.server.link.history[3]
    for client in fed.clients.values():
        assert client.synced_round == 2
        assert torch.equal(aggregate_paths(client.values, fed.params.mask, last, noise=fed.params.noise), fed.server.values)


class Tamper:
    """A transport that corrupts one client's reply."""

    def __init__(self, inner, victim, how):
        self.inner, self.victim, self.how = inner, victim, how

    def send_and_receive(self, plans):
        replies = self.inner.send_and_receive(plans)
        if self.victim in replies:
            replies[self.victim] = self.how(replies[self.victim])
        return replies


def _with_scalars(reply, scalars):
    update = decode_update(reply)
    return encode_update(ClientUpdate(update.round, update.client_id, np.asarray(scalars, np.float32),
                                      update.losses, update.num_examples))


@pytest.mark.parametrize("how,reason", [
    (lambda r: _with_scalars(r, [1.0]), "scalars for"),
    (lambda r: _with_scalars(r, [float("nan"), 1.0]), "non-finite"),
    (lambda r: _with_scalars(r, [1e30, 1.0]), "bound"),
    (lambda r: b"\x00garbage" * 10, "not a meerkat message"),
    (lambda r: r[:-3], "past the end"),
    (lambda r: None, "no reply"),
])
def test_a_bad_reply_is_rejected_counted_and_the_others_still_aggregate(tiny_cfg, how, reason):
    fed = build_federation(tiny_cfg)
    good = build_federation(tiny_cfg)
    transport = Tamper(InProcessTransport(fed.clients, fed.runtime), 0, how)
    _, _, _, result = one_round(fed, transport)
    assert 0 in result.rejected and reason in result.rejected[0]
    assert fed.server.rejected_total == 1 and 0 not in result.accepted
    # the global model equals aggregating the honest clients alone
    _, _, _, honest = one_round(good)
    paths = [p for p in honest.paths if p.client_id != 0]
    weights = normalised_weights({p.client_id: good.clients[p.client_id].num_examples for p in paths}, "data_size")
    # the robust bound (fed/robust.py) is the honest clients' own, from their raw scalars
    scalars, _ = fed.server.clip.apply({p.client_id: honest.updates[p.client_id].scalars for p in paths})
    from dataclasses import replace

    expected = aggregate_paths(fed.runtime.initial_values, fed.params.mask,
                               [replace(p, weight=weights[p.client_id], scalars=scalars[p.client_id]) for p in paths],
                               noise=fed.params.noise)
    assert torch.equal(fed.server.values, expected)


def test_when_every_reply_is_bad_the_global_model_is_untouched(tiny_cfg):
    fed = build_federation(tiny_cfg)
    start = fed.server.values.clone()

    class Silent:
        def send_and_receive(self, plans):
            return {cid: None for cid in plans}

    one_round(fed, Silent())
    assert torch.equal(fed.server.values, start)


@GENERATORS
def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_cfg, tmp_path, assert_same_run, generator):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=4", "fed.strategy=fedmezo", "fed.downlink=scalars",
                                            f"zo.noise_generator={generator}"])
    full = simulate(cfg, tmp_path / "full", progress=False)
    partial = simulate(cfg, tmp_path / "cut", progress=False, stop_after=2)
    assert partial == {"interrupted_at_round": 2}
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as handle:  # a half-written line, as a kill -9 leaves
        handle.write('{"round": 3, "train_lo')
    resumed = simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert resumed["final/accuracy"] == full["final/accuracy"]


def test_run_folder_has_the_promised_files(tiny_cfg, tmp_path):
    summary = simulate(tiny_cfg, tmp_path, progress=False)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "patch.safetensors", "checkpoint.safetensors",
                 "partition.json", "partition.txt"):
        assert (tmp_path / name).exists(), name
    for key in ("method", "task", "num_clients", "local_steps", "rounds", "zero_shot/accuracy", "zero_shot/loss",
                "final/accuracy", "final/loss", "bytes_up_per_round", "bytes_down_per_round", "wall_seconds"):
        assert key in summary
    assert summary["primary_metric"] == "accuracy"
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"round", "train_loss", "eval/accuracy", "eval/loss", "bytes_up", "bytes_down", "seconds"} <= set(row)
    by_client = row["train_loss_by_client"]  # one entry per accepted client; their mean is the round's loss
    assert sorted(map(int, by_client)) == row["clients"]
    assert sum(by_client.values()) / len(by_client) == pytest.approx(row["train_loss"], rel=1e-12)
    assert config.load(tmp_path / "config.toml") == tiny_cfg


def test_plans_are_encoded_when_the_transport_reads_them(tiny_cfg):
    # The values downlink puts the whole trainable vector in every plan: encoding them lazily keeps one
    # client's copy alive at a time instead of one per sampled client.
    fed = build_federation(tiny_cfg)
    plans, encoded = fed.server.configure_round()
    assert encoded.sizes == {} and list(encoded) == list(plans)
    seen = []

    class Spy:
        def send_and_receive(self, lazy):
            inner = InProcessTransport(fed.clients, fed.runtime)

            class Watch(dict):
                def __getitem__(self, cid):
                    seen.append(sorted(lazy.sizes))  # plans encoded before this one was read
                    return lazy[cid]

            return inner.send_and_receive(Watch.fromkeys(lazy))

    result = fed.server.aggregate_round(plans, encoded, Spy().send_and_receive(encoded))
    order = list(plans)
    assert seen == [sorted(order[:i]) for i in range(len(order))]  # each encoded only when its turn came
    assert result.bytes_down == {cid: len(encode_plan(plans[cid])) for cid in plans}
