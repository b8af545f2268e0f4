"""The method matrix (STYLE 18, PEFT's test matrix): every registered method x every downlink it supports x
{iid, dirichlet, pathological}, two rounds on the tiny model, checking what each promises:

- bytes: the uplink is T float32 scalars (and T losses) plus a small header, or for a first-order client
  (the plan's estimator) its masked delta, 4 bytes per trainable value; the downlink is bounded by what the
  downlink promises (the values: 4 bytes per trainable value; the pool: at most K coefficients and positions);
- exact state: every client that replays or catches up holds the server's global values bit for bit;
- resume: a run cut after round 1 and resumed ends with the same patch and metrics as an uninterrupted one
  (once per method and downlink, on the Dirichlet partition).
"""

from __future__ import annotations

import pytest
import torch

from meerkat_fl import config
from meerkat_fl.fed.messages import UPLINKS
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.transport import InProcessTransport
from meerkat_fl.methods import METHODS

HEADER = 400  # bytes: a generous bound on a message's header and framing
POOL = 64  # a small seed pool for the pool methods (K), so the tiny runs stay fast
PARTITIONS = ("iid", "dirichlet", "pathological")
CELLS = [(m, d, p) for m in sorted(METHODS) for d in METHODS[m].downlinks for p in PARTITIONS]


def cell_config(base, method: str, downlink: str, partition: str, rounds: int = 2):
    # the base's own mask kind back to the default first: a method's fixed keys must not meet a contradiction
    extra = ["mask.kind='sensitive'", f"method={method!r}", f"fed.downlink={downlink!r}", f"fed.partition={partition!r}",
             f"fed.rounds={rounds}", "fed.labels_per_client=1", "run.eval_every=0", "vp.calibration_steps=2",
             "vp.early_window=[0, 1]", "vp.late_window=[1, 2]"]
    if METHODS[method].defaults.get("fedkseed.pool_size"):
        extra.append(f"fedkseed.pool_size={POOL}")
    if METHODS[method].fixed.get("mask.kind", METHODS[method].defaults.get("mask.kind")) == "dense":
        extra.append("zo.lr=1e-4")
    return config.validate(config.resolve_environment(config.apply_overrides(base, extra)))


@pytest.mark.parametrize("method,downlink,partition", CELLS, ids=["-".join(c) for c in CELLS])
def test_method_keeps_its_promises(tiny_cfg, method, downlink, partition):
    cfg = cell_config(tiny_cfg, method, downlink, partition)
    fed = build_federation(cfg)
    transport = InProcessTransport(fed.clients, fed.runtime)
    T, size = cfg.fed.local_steps, fed.params.size
    start = fed.server.values.clone()
    for _ in range(cfg.fed.rounds):
        plans, encoded = fed.server.configure_round()
        result = fed.server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))
        assert not result.rejected, result.rejected
        delta = {cid: 4 * size if UPLINKS[plans[cid].estimator] == "values" else 0 for cid in plans}
        assert all(n <= HEADER + 8 * T + delta[cid] for cid, n in result.bytes_up.items())
        bound = {"values": 4 * size, "pool": 8 * POOL}.get(downlink)
        if bound is not None:
            assert all(n <= HEADER + bound for n in result.bytes_down.values())
    assert not torch.equal(fed.server.values, start)  # it trained
    # every client, synced through its downlink to the current round, holds the server's values exactly
    for cid, client in fed.clients.items():
        plan = fed.server.plan_for(cid, fed.server.round)
        assert torch.equal(client.sync(plan, fed.runtime), fed.server.values), (cid, plan.synced_round)


RESUME = sorted({(m, d) for m, d, _ in CELLS})


@pytest.mark.parametrize("method,downlink", RESUME, ids=["-".join(c) for c in RESUME])
def test_method_resumes_bit_identically(tiny_cfg, tmp_path, method, downlink, assert_same_run):
    cfg = cell_config(tiny_cfg, method, downlink, "dirichlet", rounds=3)
    full = simulate(cfg, tmp_path / "full", progress=False)
    assert simulate(cfg, tmp_path / "cut", progress=False, stop_after=1) == {"interrupted_at_round": 1}
    resumed = simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert resumed["method"] == full["method"] == method
