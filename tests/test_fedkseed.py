"""FedKSeed's seed pool on the tiny model: pool seeds, coefficient aggregation, the exact "pool" downlink,
its bytes, hostile pool messages, and resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from meerkat_fl import config
from meerkat_fl.errors import ConfigError, MessageRejected
from meerkat_fl.fed import checkpoint, seedpool
from meerkat_fl.fed.aggregate import aggregate_paths
from meerkat_fl.fed.messages import RoundPlan, decode_plan, encode_plan
from meerkat_fl.fed.seedpool import PoolModel, SeedPool, pool_index, pool_seeds, pro_probabilities
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.transport import InProcessTransport
from meerkat_fl.patch import load_patch
from meerkat_fl.zo import noise

K = 16  # small enough that a few rounds touch every coefficient


def pool_cfg(tiny_cfg, *overrides):
    return config.apply_overrides(tiny_cfg, [f"fedkseed.pool_size={K}", "fed.downlink=pool", *overrides])


def one_round(fed, transport=None):
    transport = transport or InProcessTransport(fed.clients, fed.runtime)
    plans, encoded = fed.server.configure_round()
    replies = transport.send_and_receive(encoded)
    return plans, encoded, fed.server.aggregate_round(plans, encoded, replies)


def test_pool_seeds_are_distinct_and_a_pure_function_of_the_run_seed():
    first = pool_seeds(7, 256).copy()
    seedpool._pool.cache_clear()  # recompute, not a cached object
    assert np.array_equal(pool_seeds(7, 256), first)
    assert np.unique(first).size == 256
    assert not np.array_equal(pool_seeds(8, 256), first)
    assert pool_index(7, 256)[int(first[5])] == 5


@pytest.mark.parametrize("sampling", ["uniform", "pro"])
def test_every_step_seed_is_drawn_from_the_pool_deterministically(tiny_cfg, sampling):
    cfg = pool_cfg(tiny_cfg, f"fedkseed.sampling={sampling}")
    a, b = build_federation(cfg), build_federation(cfg)
    pool = set(pool_seeds(cfg.run.seed, K).tolist())
    drawn = []
    for _ in range(2):
        plans_a, _, _ = one_round(a)
        plans_b = {cid: b.server.plan_for(cid, b.server.round) for cid in plans_a}
        one_round(b)
        for cid, plan in plans_a.items():
            assert np.array_equal(plan.seeds, plans_b[cid].seeds) and plan.pool_size == K
            assert set(plan.seeds.tolist()) <= pool
            drawn.append(tuple(plan.seeds.tolist()))
    assert len(set(drawn)) > 1  # clients and rounds draw different steps


def test_pool_aggregation_is_the_weighted_mean_of_the_virtual_paths(tiny_cfg):
    cfg = pool_cfg(tiny_cfg, "fed.downlink=values")
    fed = build_federation(cfg)
    start = fed.server.values.clone()
    _, _, result = one_round(fed)
    # the coefficients are -lr * p_k * g summed per pool seed ...
    by_hand = np.zeros(K)
    index_of = pool_index(cfg.run.seed, K)
    for path in result.paths:
        for seed, scalar in zip(path.seeds.tolist(), path.scalars.tolist()):
            by_hand[index_of[seed]] -= path.lr * path.weight * scalar
    coefficients = fed.server.seed_pool.model.coefficients
    np.testing.assert_allclose(coefficients, by_hand, rtol=1e-6, atol=1e-12)
    # ... the model is start + sum_j c_j z_j, which is Meerkat's mean of the replayed virtual paths
    mask = fed.params.mask
    direct = start.double() + sum(float(c) * noise(int(s), mask).double()
                                  for c, s in zip(coefficients, pool_seeds(cfg.run.seed, K)))
    np.testing.assert_allclose(fed.server.values.double().numpy(), direct.numpy(), rtol=0, atol=1e-7)
    meerkat = aggregate_paths(start, mask, result.paths, noise=fed.params.noise)
    np.testing.assert_allclose(fed.server.values.numpy(), meerkat.numpy(), rtol=0, atol=1e-6)
    assert not torch.equal(fed.server.values, start)


@pytest.mark.parametrize("downlink", ["pool", "scalars"])
def test_clients_rebuild_the_servers_values_bit_for_bit_after_skipping_rounds(tiny_cfg, downlink):
    cfg = pool_cfg(tiny_cfg, f"fed.downlink={downlink}", "fed.sample_count=1", "fed.rounds=8")
    fed = build_federation(cfg)
    initial = fed.runtime.initial_values
    caught_up = []  # rounds each sampled client had missed when it caught up
    for _ in range(8):
        start, away = fed.server.values.clone(), {cid: fed.server.round - 1 - c.synced_round
                                                  for cid, c in fed.clients.items()}
        plans, _, result = one_round(fed)
        for cid in plans:  # the sampled client trained from exactly the server's values
            client = fed.clients[cid]
            assert client.synced_round == result.round - 1
            assert torch.equal(client.pool.values(initial), start), f"client {cid}, {away[cid]} rounds away"
            caught_up.append(away[cid])
    assert max(caught_up) >= 3
    # every client, however long it has been away (one never came), catches up exactly in one message
    plans = {cid: fed.server.plan_for(cid, fed.server.round) for cid in fed.clients}
    away = {cid: fed.server.round - 1 - c.synced_round for cid, c in fed.clients.items()}
    assert max(away.values()) >= 3
    for cid, plan in plans.items():
        values = fed.clients[cid].sync(decode_plan(encode_plan(plan)), fed.runtime)
        assert torch.equal(values, fed.server.values), f"client {cid}, {away[cid]} rounds away"
    assert not torch.equal(fed.server.values, initial)


def test_every_downlink_reaches_the_same_global_model_with_a_pool(tiny_cfg, tmp_path):
    cfg = pool_cfg(tiny_cfg, "fed.sample_count=2", "fed.rounds=4", "run.eval_every=0")
    summaries = {d: simulate(config.apply_overrides(cfg, [f"fed.downlink={d}"]), tmp_path / d, progress=False)
                 for d in ("values", "scalars", "pool")}
    patches = {d: load_patch(tmp_path / d / "patch.safetensors").values for d in summaries}
    assert torch.equal(patches["values"], patches["pool"]) and torch.equal(patches["values"], patches["scalars"])
    assert summaries["pool"]["bytes_down_per_round"] < summaries["values"]["bytes_down_per_round"]


def test_a_catch_up_needs_at_most_K_noise_generations(tiny_cfg):
    fed = build_federation(pool_cfg(tiny_cfg, "fed.local_steps=6"))
    for _ in range(4):
        one_round(fed)
    assert np.count_nonzero(fed.server.seed_pool.model.coefficients) == K  # 96 steps over 16 seeds
    positions, coefficients = fed.server.seed_pool.catch_up(-1)
    fresh = PoolModel.zeros(K, fed.params.size)
    generated = fresh.move(fed.params.mask, pool_seeds(fed.cfg.run.seed, K), np.arange(K), coefficients,
                           noise=fed.params.noise)
    assert positions is None and generated == K  # 96 steps, 4 rounds: still K draws of z
    assert torch.equal(fresh.values(fed.runtime.initial_values), fed.server.values)


def test_clients_of_one_process_share_a_catch_up_and_draw_its_noise_once(tiny_cfg, monkeypatch):
    fed = build_federation(pool_cfg(tiny_cfg, "fed.num_clients=4", "fed.rounds=3"))
    one_round(fed)
    moves = []
    real_move = PoolModel.move
    monkeypatch.setattr(PoolModel, "move", lambda self, *a, **k: moves.append(id(self)) or real_move(self, *a, **k))
    start = fed.server.values.clone()
    one_round(fed)  # every client catches up from the same round-1 model with the same message
    pools = [client.pool for client in fed.clients.values()]
    assert all(pool is pools[0] for pool in pools)  # one object, not four 8-byte-per-weight copies
    assert len([m for m in moves if m != id(fed.server.seed_pool.model)]) == 1  # the noise is drawn once
    assert torch.equal(pools[0].values(fed.runtime.initial_values), start)
    # the shared result is the one a lone client computes from scratch, bit for bit
    positions, coefficients = fed.server.seed_pool.catch_up(-1)
    lone = PoolModel.zeros(K, fed.params.size)
    real_move(lone, fed.params.mask, pool_seeds(fed.cfg.run.seed, K), np.arange(K) if positions is None else positions,
              coefficients, noise=fed.params.noise)
    one_round(fed)
    assert torch.equal(lone.values(fed.runtime.initial_values), fed.clients[0].pool.values(fed.runtime.initial_values))
    # a fresh client (no model) never takes a result built from another client's model
    fresh = seedpool.client_catch_up(None, fed.params.mask, fed.cfg.run.seed, K, positions, coefficients, "cpu",
                                     noise=fed.params.noise)
    assert fresh is not fed.clients[0].pool and torch.equal(fresh.accumulator, lone.accumulator)


def test_pool_downlink_bytes_are_K_bounded_and_do_not_grow_with_rounds_missed(tiny_cfg):
    cfg = pool_cfg(tiny_cfg, "fed.local_steps=6")
    fed = build_federation(cfg)
    for _ in range(4):
        one_round(fed)
    server, cid = fed.server, 0
    bare = len(encode_plan(dataclasses.replace(server.plan_for(cid, server.round), pool_positions=None,
                                               pool_coefficients=None)))
    pool_bytes, payload = {}, {}
    for synced in (2, 1, 0, -1):  # 1, 2, 3 and 4 rounds missed
        server.link.client_synced[cid] = synced
        plan = server.plan_for(cid, server.round)
        pool_bytes[synced] = len(encode_plan(plan))
        payload[synced] = plan.pool_coefficients.nbytes + (0 if plan.pool_positions is None else
                                                           plan.pool_positions.nbytes)
    assert all(n <= bare + 4 * K + 80 for n in pool_bytes.values())  # K float32 + two array specs
    assert payload[-1] == payload[0] == payload[1] == 4 * K  # all K coefficients, however long it was away
    assert payload[2] <= 4 * K
    # the "scalars" downlink would carry 4 clients x 6 steps x 12 bytes per round missed
    assert pool_bytes[-1] < bare + 4 * 4 * 6 * 12


def test_the_papers_4096_seed_pool_catches_up_in_under_18_kilobytes(tiny_cfg):
    fed = build_federation(tiny_cfg)
    pool = SeedPool(0, 4096, fed.params.mask, fed.runtime.initial_values, noise=fed.params.noise)
    pool.model.coefficients[:] = np.linspace(-1e-3, 1e-3, 4096, dtype=np.float32)
    pool.changed_round[:] = 9
    positions, coefficients = pool.catch_up(-1)
    plan = RoundPlan(10, 0, pool.step_seeds(10, 0, 10), 1e-2, 1e-3, 4, synced_round=-1, pool_size=4096,
                     pool_positions=positions, pool_coefficients=coefficients)
    assert positions is None and len(encode_plan(plan)) < 18 * 1024


def _tampered(plan, **changes):
    return encode_plan(dataclasses.replace(plan, **changes))


@pytest.mark.parametrize("changes,reason", [
    (lambda p: {"pool_positions": np.array([0, 1, 2], np.int32), "pool_coefficients": np.zeros(2, np.float32)},
     "3 pool positions for 2 coefficients"),
    (lambda p: {"pool_positions": None, "pool_coefficients": np.zeros(K - 1, np.float32)},
     f"{K - 1} pool coefficients without positions"),
    (lambda p: {"pool_positions": None, "pool_coefficients": np.full(K, np.nan, np.float32)}, "non-finite"),
    (lambda p: {"pool_positions": np.array([1, K], np.int32), "pool_coefficients": np.ones(2, np.float32)},
     f"pool position {K} is out of range"),
    (lambda p: {"pool_positions": np.array([-3], np.int32), "pool_coefficients": np.ones(1, np.float32)},
     "pool position -3 is out of range"),
    (lambda p: {"pool_positions": np.array([2, 2], np.int32), "pool_coefficients": np.ones(2, np.float32)},
     "not strictly increasing"),
    (lambda p: {"pool_positions": None, "pool_coefficients": np.full(K, 1e9, np.float32)}, "above the bound"),
    (lambda p: {"pool_size": 0}, "without a seed pool"),
    (lambda p: {"seeds": p.seeds + 1}, "not in the seed pool"),
    (lambda p: {"synced_round": p.round - 1}, "only cover changes after round"),
    (lambda p: {"synced_round": p.round}, "'synced_round' = 1 is outside"),  # refused by the decoder itself
])
def test_a_hostile_pool_message_is_rejected_and_the_client_recovers_exactly(tiny_cfg, changes, reason):
    fed = build_federation(pool_cfg(tiny_cfg))
    one_round(fed)
    victim = fed.clients[0]
    before = (victim.synced_round, victim.pool.clone())

    class Hostile:  # the server's plan for client 0 is replaced in transit
        def __init__(self):
            self.inner = InProcessTransport(fed.clients, fed.runtime)

        def send_and_receive(self, encoded):
            encoded = dict(encoded)
            encoded[0] = _tampered(decode_plan(encoded[0]), **changes(decode_plan(encoded[0])))
            with pytest.raises(MessageRejected, match=reason):
                victim.sync(decode_plan(encoded[0]), fed.runtime)
            return self.inner.send_and_receive(encoded)

    _, _, result = one_round(fed, Hostile())
    assert result.rejected == {0: "no reply"} and result.accepted == [1, 2, 3]
    assert victim.synced_round == before[0] and torch.equal(victim.pool.accumulator, before[1].accumulator)
    assert fed.server.link.client_synced[0] == -1  # it may not have synced: next time it gets every coefficient
    start = fed.server.values.clone()
    one_round(fed)
    assert victim.synced_round == fed.server.round - 2 and torch.equal(victim.pool.values(fed.runtime.initial_values),
                                                                      start)


@pytest.mark.parametrize("downlink,sampling", [("pool", "pro"), ("scalars", "uniform")])
def test_a_pool_run_resumes_bit_identically(tiny_cfg, tmp_path, downlink, sampling, assert_same_run):
    cfg = pool_cfg(tiny_cfg, f"fed.downlink={downlink}", f"fedkseed.sampling={sampling}", "fed.rounds=4",
                   "fed.sample_count=2", "run.eval_every=0")
    full = simulate(cfg, tmp_path / "full", progress=False)
    assert simulate(cfg, tmp_path / "cut", progress=False, stop_after=2) == {"interrupted_at_round": 2}
    resumed = simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert resumed["final/accuracy"] == full["final/accuracy"]
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert full["method"] == ("fedkseed_pro" if sampling == "pro" else "fedkseed") and full["mask_kind"] == "random"
    assert full["seed_pool"] == K and read(tmp_path / "full")[-1]["pool_nonzero"] > 0


def test_pro_sampling_favours_seeds_with_larger_mean_gradients():
    probabilities = pro_probabilities(np.array([0.0, 3.0, 30.0, 0.0]), np.array([0, 1, 1, 0]))
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[2] > probabilities[1] > probabilities[0] == probabilities[3]
    assert probabilities[2] / probabilities[0] == pytest.approx(np.e)  # softmax of values min-max scaled to [0, 1]
    uniform = pro_probabilities(np.zeros(5), np.zeros(5))
    assert np.allclose(uniform, 0.2)


def test_a_flower_node_keeps_the_pool_state_between_messages_and_stays_exact(tiny_cfg):
    """node.fit_one (what a Flower node runs per message, no Flower needed) with the state as bytes."""
    from meerkat_fl.fed.simulate import build_client_side
    from meerkat_fl.flower.node import empty_state, fit_one

    cfg = pool_cfg(tiny_cfg, "fed.sample_count=2")
    fed, node = build_federation(cfg), build_client_side(cfg)
    states = {cid: empty_state() for cid in node.clients}
    for _ in range(4):
        start = fed.server.values.clone()
        plans, encoded = fed.server.configure_round()
        answers = {cid: fit_one(node, cid, blob, states[cid]) for cid, blob in encoded.items()}
        fed.server.aggregate_round(plans, encoded, {cid: a["update"] for cid, a in answers.items()})
        for cid, answer in answers.items():
            states[cid] = answer["state"]
            pool = PoolModel.from_bytes(answer["state"]["pool"], node.params.size)
            assert torch.equal(pool.values(node.runtime.initial_values), start)
    with pytest.raises(MessageRejected, match="does not fit"):
        PoolModel.from_bytes(states[cid]["pool"][:-3], node.params.size)


@pytest.mark.parametrize("overrides,key", [
    (["fed.downlink=pool"], "fed.downlink=pool needs a seed pool"),
    (["fedkseed.sampling=pro"], "fedkseed.sampling=pro needs a seed pool"),
    (["fedkseed.pool_size=-1"], "fedkseed.pool_size"),
    (["fedkseed.pool_size=4096", "fedkseed.sampling=best"], "fedkseed.sampling"),
])
def test_bad_pool_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, overrides)


def test_method_names_say_fedkseed():
    name = lambda *o: config.method_name(config.load(None, list(o)))
    assert name("fedkseed.pool_size=4096", "mask.kind=dense") == "fedkseed"
    assert name("fedkseed.pool_size=4096", "mask.kind=dense", "fedkseed.sampling=pro") == "fedkseed_pro"
    assert name("fedkseed.pool_size=4096") == "fedkseed"  # a pool over Meerkat's mask: still FedKSeed's rule
    with pytest.raises(ConfigError, match='method = "fedkseed"'):  # no registered method: the error names one
        name("fedkseed.pool_size=4096", "fed.strategy=fedmezo")
    assert name("method='fedkseed_pro'") == "fedkseed_pro"
    assert name("mask.kind=dense") == "full_fedzo"


def test_clients_that_shared_a_pool_model_share_it_again_after_a_checkpoint(tiny_cfg):
    fed = build_federation(pool_cfg(tiny_cfg, "fed.num_clients=4", "fed.rounds=3"))
    one_round(fed)
    one_round(fed)  # every client caught up from the same model with the same message: one shared object
    states = checkpoint.client_states_from(fed.clients)
    assert all(s.pool is states[0].pool for s in states.values())
    tensors, plain = checkpoint.pack_clients(states)
    loaded = checkpoint.unpack_clients(tensors, plain, fed.params.size, "cpu")
    pools = [state.pool for state in loaded.values()]
    assert all(pool is pools[0] for pool in pools) and pools[0] is not states[0].pool  # one copy, not four
    assert torch.equal(pools[0].accumulator, states[0].pool.accumulator)
    # a client whose model differs keeps its own
    odd = {**states, 3: dataclasses.replace(states[3], pool=PoolModel.zeros(K, fed.params.size))}
    tensors, plain = checkpoint.pack_clients(odd)
    loaded = checkpoint.unpack_clients(tensors, plain, fed.params.size, "cpu")
    assert loaded[0].pool is loaded[1].pool is loaded[2].pool and loaded[3].pool is not loaded[0].pool
    assert not loaded[3].pool.accumulator.any()
