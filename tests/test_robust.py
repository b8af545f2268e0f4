"""A hostile client's influence is bounded by the round's honest clients; one NaN cannot halt FedMeZO."""

import json

import numpy as np
import pytest
import torch

from meerkat_fl import config
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.aggregate import aggregate_paths
from meerkat_fl.fed.messages import ClientUpdate, decode_update, encode_update
from meerkat_fl.fed.robust import ScalarClip, lower_median
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.strategies import ClientInstructions, FedMeZOStrategy
from meerkat_fl.fed.transport import InProcessTransport


def test_lower_median_takes_the_smaller_middle_value():
    assert lower_median(np.array([5.0, 1.0, 3.0])) == 3.0
    assert lower_median(np.array([1.0, 1e9])) == 1.0  # one of two cannot pull the bound up


def test_norm_clip_scales_only_the_client_above_the_bound():
    honest = {0: np.array([0.3, -0.4], np.float32), 1: np.array([0.6, 0.8], np.float32),
              2: np.array([-1.2, 0.9], np.float32)}
    scalars, metrics = ScalarClip("norm", 2.0).apply({**honest, 3: np.array([9e5, -9e5], np.float32)})
    # norms 0.5, 1, 1.5, 1.27e6 over 2 scalars each: root-mean-squares norm / sqrt(2), lower median 1 / sqrt(2)
    assert metrics["clip_bound"] == pytest.approx(2.0 / np.sqrt(2.0))
    for cid, values in honest.items():
        assert scalars[cid] is values or np.array_equal(scalars[cid], values)  # bit for bit
    assert np.linalg.norm(scalars[3]) == pytest.approx(2.0, rel=1e-6)  # bound x sqrt(2 scalars)
    assert np.sign(scalars[3]).tolist() == [1.0, -1.0]  # the direction is kept
    assert metrics["clipped_by_client"] == {"0": 0, "1": 0, "2": 0, "3": 2}


def test_norm_clip_bounds_each_step_so_clients_taking_more_steps_are_not_scaled_down():
    # Meerkat-vp's round after detection: 4 stopped clients take 1 step, 2 take 50, all with scalars of the
    # same size. A bound on whole-vector norms (lower median 1.0, factor 4) scaled the 50-step clients (norm
    # sqrt(50) = 7.07) down to 4; per step, nobody is above the bound.
    rng = np.random.default_rng(0)
    signs = lambda n: rng.choice([-1.0, 1.0], n).astype(np.float32)
    replies = {**{cid: signs(1) for cid in range(4)}, 4: signs(50), 5: signs(50)}
    scalars, metrics = ScalarClip("norm", 4.0).apply(replies)
    assert metrics["clipped_by_client"] == {str(cid): 0 for cid in range(6)}
    assert all(np.array_equal(scalars[cid], replies[cid]) for cid in replies)
    # a one-step client is held to factor x the round's typical step, a 50-step one to that times sqrt(50)
    scalars, metrics = ScalarClip("norm", 4.0).apply({**replies, 0: np.array([100.0], np.float32),
                                                      5: signs(50) * np.float32(100.0)})
    assert metrics["clipped_by_client"]["0"] == 1 and metrics["clipped_by_client"]["5"] == 50
    assert abs(float(scalars[0][0])) == pytest.approx(4.0, rel=1e-6)
    assert np.linalg.norm(scalars[5]) == pytest.approx(4.0 * np.sqrt(50.0), rel=1e-6)


def test_scalar_clip_bounds_every_scalar_and_none_keeps_everything():
    replies = {0: np.array([0.1, -0.2, 0.3], np.float32), 1: np.array([50.0, -50.0, 0.2], np.float32)}
    scalars, metrics = ScalarClip("scalar", 3.0).apply(replies)
    assert metrics["clip_bound"] == pytest.approx(3.0 * 0.2)  # |g| sorted: .1 .2 .2 .3 50 50
    assert np.allclose(scalars[1], [0.6, -0.6, 0.2]) and np.array_equal(scalars[0], replies[0])
    kept, metrics = ScalarClip("none").apply(replies)
    assert metrics["clip_bound"] is None and all(np.array_equal(kept[k], replies[k]) for k in replies)


@pytest.mark.parametrize("rule,factor", [("median", 2.0), ("norm", 0.0), ("norm", float("nan"))])
def test_a_bad_clip_rule_is_refused(rule, factor):
    with pytest.raises(ValueError):
        ScalarClip(rule, factor)


@pytest.mark.parametrize("override", ["fed.clip=median", "fed.clip_factor=0", "fed.clip_factor=nan",
                                      "fed.max_abs_scalar=inf", "fed.max_abs_scalar=-1"])
def test_robustness_keys_are_validated(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        config.load(None, [override])


class Hostile:
    """A transport that rewrites one client's reply: its scalars become ``how(honest scalars)``."""

    def __init__(self, inner, attacker, how):
        self.inner, self.attacker, self.how = inner, attacker, how

    def send_and_receive(self, plans):
        replies = self.inner.send_and_receive(plans)
        if replies.get(self.attacker) is not None:
            update = decode_update(replies[self.attacker])
            scalars = np.asarray(self.how(update.scalars), np.float32)
            replies[self.attacker] = encode_update(ClientUpdate(update.round, update.client_id, scalars,
                                                                update.losses, update.num_examples, update.metrics))
        return replies


def _round(fed, transport):
    plans, encoded = fed.server.configure_round()
    return fed.server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))


def test_scalars_just_under_the_absolute_cap_move_the_model_no_more_than_honest_clients(tiny_cfg):
    # today's main accepted 1e5 (under its 1e6 cap) unclipped: one client moved the model ~1e5x an honest one
    fed = build_federation(tiny_cfg)
    start = fed.server.values.clone()
    result = _round(fed, Hostile(InProcessTransport(fed.clients, fed.runtime), 0, lambda g: np.full_like(g, 9e5)))
    assert 0 in result.accepted and result.metrics["clipped_by_client"]["0"] == tiny_cfg.fed.local_steps
    norms = {p.client_id: float(np.linalg.norm(p.scalars)) for p in result.paths}
    honest = sorted(v for k, v in norms.items() if k != 0)
    assert norms[0] <= tiny_cfg.fed.clip_factor * honest[(len(norms) - 1) // 2] * (1 + 1e-6)
    moved = (fed.server.values - start).abs().max().item()
    assert moved < 1.0  # the masked weights are O(0.1); an unclipped 9e5 moves them by ~1e3


def test_replay_stays_exact_with_clipping_active(tiny_cfg):
    cfg = config.apply_overrides(tiny_cfg, ["fed.downlink=scalars"])
    fed = build_federation(cfg)
    transport = Hostile(InProcessTransport(fed.clients, fed.runtime), 2, lambda g: -1000.0 * g)
    clipped = 0
    for _ in range(3):
        result = _round(fed, transport)
        clipped += result.metrics["clipped_by_client"]["2"]
    assert clipped > 0
    last = fed.server.link.history[2]
    for client in fed.clients.values():  # each client replayed rounds 0..1 from the clipped paths it was sent
        assert client.synced_round == 1
        assert torch.equal(aggregate_paths(client.values, fed.params.mask, last, noise=fed.params.noise), fed.server.values)


def test_clip_counts_reach_metrics_jsonl(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=2", "run.eval_every=0"])

    class Late:  # the transport is built once the federation exists
        def __init__(self):
            self.fed = None

        def send_and_receive(self, plans):
            inner = InProcessTransport(self.fed.clients, self.fed.runtime)
            return Hostile(inner, 1, lambda g: np.full_like(g, 5e5)).send_and_receive(plans)

    late = Late()
    simulate(cfg, tmp_path, progress=False, transport=late, on_built=lambda fed: setattr(late, "fed", fed))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["clipped_by_client"]["1"] for r in rows] == [cfg.fed.local_steps] * 2
    assert all(r["clip_bound"] > 0 for r in rows)


def _update(cid, losses):
    return ClientUpdate(0, cid, np.zeros(len(losses), np.float32), np.asarray(losses, np.float32), 10)


@pytest.mark.parametrize("signal", ["last_loss", "mean_loss_5"])
def test_fedmezo_takes_no_signal_from_a_client_without_a_finite_loss(signal):
    # main counted a client whose steps were all skipped (no loss) as a loss of 0, the best client: it got
    # the lowest lr and moved every other client's index; a NaN among losses made the whole round's mean NaN
    strategy = FedMeZOStrategy(signal, lr_scale=1e-4)
    updates = {0: _update(0, [0.5, 0.6]), 1: _update(1, [0.9, 0.8]), 2: _update(2, []),
               3: _update(3, [0.7, float("nan")])}
    strategy.aggregate(0, torch.zeros(1), None, [], updates, lambda start, paths: start)
    told = strategy.configure(1, sorted(updates), ClientInstructions(1e-3, 2))
    lrs = {cid: told[cid].lr for cid in updates}
    assert all(np.isfinite(v) and v > 0 for v in lrs.values())
    assert lrs[2] == 1e-3  # no signal: the base lr
    assert strategy.phi == pytest.approx({0: -1.0, 1: 1.0, 3: 0.0}, abs=1e-6)  # float32 losses .55 .85 .7


def test_a_nan_loss_reply_is_rejected_and_fedmezo_keeps_training(tiny_cfg):
    cfg = config.apply_overrides(tiny_cfg, ["fed.strategy=fedmezo", "fedmezo.signal=last_loss",
                                            "fedmezo.lr_scale=1e-3"])
    fed = build_federation(cfg)

    class NaNLoss(Hostile):
        def send_and_receive(self, plans):
            replies = self.inner.send_and_receive(plans)
            update = decode_update(replies[1])
            nan = np.full(update.losses.size, np.nan, np.float32)
            replies[1] = encode_update(ClientUpdate(update.round, 1, update.scalars, nan, update.num_examples))
            return replies

    result = _round(fed, NaNLoss(InProcessTransport(fed.clients, fed.runtime), 1, None))
    assert "non-finite" in result.rejected[1]
    plans, _ = fed.server.configure_round()
    assert all(np.isfinite(p.lr) and p.lr > 0 for p in plans.values())
