"""The wire format's decoders are total, and plans and replies are validated before they are used."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed import fuzz
from meerkat_fl.fed.messages import (
    ClientUpdate,
    PlanLimits,
    RoundPlan,
    decode_plan,
    decode_update,
    encode_plan,
    encode_update,
    validate_plan,
    validate_update,
)
from meerkat_fl.fed.wire import MAX_DEPTH, nesting_depth


def test_decoders_raise_only_message_rejected_on_structured_and_random_mutations():
    # every header field set to NaN, Infinity, 1e400, huge ints, bools, strings, lists and objects; array
    # specs with a list as the name, duplicated, missing; deep nesting; then seeded random bytes and flips
    tic = time.perf_counter()
    structured = fuzz.run(fuzz.all_structured())
    rng = np.random.default_rng(20261202)
    random = fuzz.run(fuzz.random_cases(rng, fuzz.samples(), 3000))
    assert structured["failures"] == [] and random["failures"] == []
    assert structured["cases"] > 2000 and random["cases"] == 3000
    assert structured["families"]["structured"]["accepted"] > 0  # the valid neighbours still decode
    assert structured["slowest_case_seconds"] < 1.0 and time.perf_counter() - tic < 30


def test_valid_messages_of_every_shape_round_trip():
    for name, (kind, data) in fuzz.samples().items():
        decoded = decode_plan(data) if kind == "plan" else decode_update(data)
        again = encode_plan(decoded) if kind == "plan" else encode_update(decoded)
        assert again == data, name


def test_nesting_depth_ignores_brackets_inside_strings():
    assert nesting_depth(b'{"a":[[1]],"b":"[[[[[[[[[[[[\\"[["}') == 3
    assert nesting_depth(b"[" * 100_000) == 100_000


@pytest.mark.parametrize("nested", ["[" * 200_000, '{"a":' * 200_000, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)])
def test_a_deeply_nested_header_is_rejected_by_depth_not_by_the_stack(nested):
    prefix, _header, payload = fuzz.split(fuzz.samples()["update"][1])
    data = fuzz.frame(prefix, ('{"metrics":' + nested).encode(), payload)
    with pytest.raises(MessageRejected, match="nests deeper"):
        decode_update(data)


def _reply(scalars=(0.5, -1.0), losses=(0.7, 0.6), metrics=None) -> ClientUpdate:
    return ClientUpdate(1, 0, np.asarray(scalars, np.float32), np.asarray(losses, np.float32), 17, metrics or {})


def _plan(**changes) -> RoundPlan:
    fields = {"round": 1, "client_id": 0, "seeds": np.arange(2, dtype=np.int64), "lr": 1e-2, "eps": 1e-3, "batch_size": 4}
    return RoundPlan(**{**fields, **changes})


@pytest.mark.parametrize("update,reason", [
    (_reply(losses=(float("nan"), 0.6)), "non-finite loss"),
    (_reply(losses=(float("inf"),)), "non-finite loss"),
    (_reply(losses=(0.1, 0.2, 0.3)), "3 losses for 2"),
    (_reply(metrics={"skipped_steps": float("nan")}), "non-finite metric"),
    (_reply(scalars=(float("inf"), 1.0)), "non-finite scalar"),
])
def test_validation_rejects_non_finite_losses_metrics_and_extra_losses(update, reason):
    with pytest.raises(MessageRejected, match=reason):
        validate_update(update, _plan(), 1e6)


def test_the_wire_refuses_non_finite_losses_before_validation():
    data = encode_update(_reply())  # the losses are the last array: its last 4 bytes are the last loss
    with pytest.raises(MessageRejected, match="non-finite value in losses"):
        decode_update(data[:-4] + np.float32("nan").tobytes())


@pytest.mark.parametrize("what,arrays", [
    ("missing scalars", [["losses", "float32", 2]]),
    ("duplicated scalars", [["scalars", "float32", 2], ["scalars", "float32", 2]]),
    ("scalars as int64", [["scalars", "int64", 1], ["losses", "float32", 2]]),
])
def test_missing_duplicated_or_mistyped_arrays_are_rejected(what, arrays):
    prefix, header, payload = fuzz.split(encode_update(_reply()))
    with pytest.raises(MessageRejected):
        decode_update(fuzz.frame(prefix, json.dumps({**header, "arrays": arrays}).encode(), payload))


@pytest.mark.parametrize("changes,reason", [
    ({"round": -1}, "'round' = -1"),
    ({"eps": 0.0}, "'eps' = 0.0"),
    ({"lr": -1e-3}, "'lr' = -0.001"),
    ({"batch_size": 0}, "'batch_size' = 0"),
    ({"synced_round": 1}, "'synced_round' = 1"),
])
def test_the_decoder_rejects_impossible_plans(changes, reason):
    with pytest.raises(MessageRejected, match=reason):
        decode_plan(encode_plan(_plan(**changes)))


@pytest.mark.parametrize("changes,reason", [
    ({"batch_size": 0}, "batch size 0"),
    ({"batch_size": -3}, "batch size -3"),
    ({"batch_size": 10**12}, "batch size 1000000000000"),
    ({"eps": 0.0}, "plan eps"),
    ({"eps": float("nan")}, "plan eps"),
    ({"lr": float("inf")}, "plan lr"),
    ({"seeds": np.arange(1_000_000, dtype=np.int64)}, "1000000 local steps"),
])
def test_a_client_rejects_a_hostile_plan_before_allocating(tiny_cfg, changes, reason):
    from meerkat_fl.fed.simulate import build_client_side

    side = build_client_side(tiny_cfg)
    client = side.clients[0]
    plan = _plan(round=0, synced_round=-1, values=side.runtime.initial_values.numpy(), **changes)
    pointer = client.pointer.state()
    tracemalloc.start()
    try:
        with pytest.raises(MessageRejected, match=reason):
            client.fit(plan, side.runtime)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # rejected before a batch, a seed list or a copy of the values was made
    assert client.pointer.state() == pointer and client.synced_round == -1


def test_plan_limits_come_from_the_clients_own_config(tiny_cfg):
    from meerkat_fl.fed.simulate import build_client_side

    limits = build_client_side(tiny_cfg).clients[0].limits
    assert limits == PlanLimits(max_batch_size=tiny_cfg.zo.batch_size, max_local_steps=tiny_cfg.fed.local_steps)
    validate_plan(_plan(batch_size=tiny_cfg.zo.batch_size), limits)
    with pytest.raises(MessageRejected, match="local steps"):
        validate_plan(_plan(seeds=np.arange(tiny_cfg.fed.local_steps + 1, dtype=np.int64)), limits)


def test_a_skipped_step_sends_no_loss_so_every_loss_on_the_wire_is_finite():
    update = _reply(scalars=(0.0, 1.0), losses=(0.6,))  # step 0 was skipped: scalar 0, no loss
    back = decode_update(encode_update(update))
    validate_update(back, _plan(), 1e6)
    assert back.losses.tolist() == pytest.approx([0.6])
