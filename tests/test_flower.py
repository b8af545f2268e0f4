"""Meerkat on Flower: the same global values as the in-process simulator, in Flower's simulation and on a
loopback deployment (TLS); a hostile reply is rejected; a SuperNode killed mid-run does not stop the run;
with SuperNode authentication only registered nodes join, and none answers for another node's client.

Each test starts its own Flower processes on free ports with a private FLWR_HOME under tmp_path, and the
``Flower`` context manager stops them, also when the test fails. Tiny model, 2 clients, 2 rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower tests need the [flower] extra: pip install -e '.[flower]'")

from meerkat_fl import config
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.fed.transport import InProcessTransport
from meerkat_fl.flower import APP_DIR
from meerkat_fl.flower.auth import make_node_keys
from meerkat_fl.flower.launch import Flower, node_settings, run_deployment, run_simulation
from meerkat_fl.flower.tls import make_certificates
from meerkat_fl.patch import load_patch

pytestmark = pytest.mark.flower
RUN_TIMEOUT = 240  # seconds for one `flwr run`: a hung run fails the test instead of the CI job


@pytest.fixture(autouse=True)
def quiet_flower(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


def small(cfg, *extra):
    return config.apply_overrides(cfg, ["fed.num_clients=2", "fed.rounds=2", "run.zero_shot=false", *extra])


def values(run: Path) -> torch.Tensor:
    return load_patch(run / "patch.safetensors").values


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class DropClient(InProcessTransport):
    """The in-process reference for a run in which ``client_id`` never gets a reply through."""

    def __init__(self, clients, runtime, client_id: int):
        super().__init__(clients, runtime)
        self.client_id = client_id

    def send_and_receive(self, plans):
        replies = super().send_and_receive(plans)
        return {cid: (None if cid == self.client_id else blob) for cid, blob in replies.items()}


def test_core_and_cli_import_without_flwr():
    blocker = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "flwr" or name.startswith(("flwr.", "ray")):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import meerkat_fl, meerkat_fl.cli, meerkat_fl.fed.simulate
        import meerkat_fl.flower, meerkat_fl.flower.launch, meerkat_fl.flower.node, meerkat_fl.flower.worker
        import meerkat_fl.flower.tls, meerkat_fl.flower.auth
        meerkat_fl.cli.build_parser().parse_args(["flower", "sim", "configs/tiny.toml"])
        assert not any(m == "flwr" or m.startswith("flwr.") for m in sys.modules)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", blocker], check=False, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_app_bundle_is_config_only_and_far_below_flowers_limit():
    files = [p for p in APP_DIR.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["pyproject.toml"]
    assert sum(p.stat().st_size for p in files) < 10 * 1024 * 1024
    text = (APP_DIR / "pyproject.toml").read_text()
    assert 'serverapp = "meerkat_fl.flower.server_app:app"' in text
    assert 'clientapp = "meerkat_fl.flower.client_app:app"' in text


@pytest.mark.parametrize("generator", ["torch_cpu", "philox"])
def test_simulation_reaches_the_in_process_values_bit_for_bit(tiny_cfg, tmp_path, generator):
    # the "scalars" downlink: every client replays the others' paths from its own state in context.state
    cfg = small(tiny_cfg, "fed.downlink=scalars", f"zo.noise_generator={generator}")
    simulate(cfg, tmp_path / "inproc", progress=False)
    summary = run_simulation(cfg, tmp_path / "flower", tmp_path / "work", timeout=RUN_TIMEOUT)
    assert torch.equal(values(tmp_path / "flower"), values(tmp_path / "inproc"))
    for ours, theirs in zip(rows(tmp_path / "flower"), rows(tmp_path / "inproc"), strict=True):
        for key in ("train_loss", "bytes_up", "bytes_down", "clients", "eval/accuracy", "eval/loss"):
            assert ours[key] == theirs[key], key
        assert ours["flower_bytes_up"] > ours["bytes_up"] and ours["flower_bytes_down"] > ours["bytes_down"]
    assert summary["engine"] == "flower" and summary["rejected_replies"] == 0
    assert {p.name for p in (tmp_path / "flower").iterdir()} == {p.name for p in (tmp_path / "inproc").iterdir()}


def test_interrupted_simulation_resumes_from_its_checkpoint(tiny_cfg, tmp_path):
    # Round 1 now, rounds 2-3 in a second `flwr run` (new Flower run, fresh virtual nodes) from the checkpoint.
    cfg = small(tiny_cfg, "fed.rounds=3")
    out = tmp_path / "flower"
    first = run_simulation(cfg, out, tmp_path / "work1", timeout=RUN_TIMEOUT, stop_after=1)
    assert first["interrupted_at_round"] == 1
    round_one = rows(out)
    assert [r["round"] for r in round_one] == [1]
    summary = run_simulation(cfg, out, tmp_path / "work2", timeout=RUN_TIMEOUT, resume=True)
    assert summary["rounds"] == 3 and summary["engine"] == "flower"
    assert [r["round"] for r in rows(out)] == [1, 2, 3] and rows(out)[0] == round_one[0]
    reference = tmp_path / "inproc"  # the same first round in process: the checkpoint both continue from
    simulate(config.apply_overrides(cfg, ["fed.rounds=1"]), reference, progress=False)
    first_values = load_patch(reference / "patch.safetensors").values
    assert rows(reference)[0]["train_loss"] == round_one[0]["train_loss"]
    assert not torch.equal(values(out), first_values) and torch.isfinite(values(out)).all()
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_simulation(cfg, tmp_path / "empty", tmp_path / "work3", timeout=RUN_TIMEOUT, resume=True)


APP_SKELETON = '''
"""A test ClientApp: Meerkat's handshake, and a train handler of the test's own."""
import dataclasses
import json

import numpy as np
from flwr.clientapp import ClientApp

from meerkat_fl.fed.messages import decode_plan, decode_update, encode_plan, encode_update
from meerkat_fl.flower import client_app, records
from meerkat_fl.local import step_seeds

app = ClientApp()


@app.query()
def query(msg, context):
    return client_app.handshake(msg, context)
'''


def custom_app(folder: Path, train_source: str) -> Path:
    """An app directory whose ClientApp is ``APP_SKELETON`` plus ``train_source`` (an ``@app.train()``)."""
    folder.mkdir()
    (folder / "pyproject.toml").write_text((APP_DIR / "pyproject.toml").read_text().replace(
        "meerkat_fl.flower.client_app:app", "custom_client_app:app"))
    (folder / "custom_client_app.py").write_text(APP_SKELETON + train_source)
    return folder


HOSTILE_TRAIN = '''
@app.train()
def train(msg, context):  # answers for client 1 with NaN scalars
    reply = client_app.fit(msg, context)
    record = reply.content[records.RECORD]
    key = records.update_key(1)
    if key in record:
        update = decode_update(record[key])
        record[key] = encode_update(dataclasses.replace(update, scalars=np.full_like(update.scalars, np.nan)))
    return reply
'''


def test_hostile_reply_is_rejected_without_touching_the_global_values(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg)
    app = custom_app(tmp_path / "hostile-app", HOSTILE_TRAIN)
    with Flower(tmp_path / "work") as flower:
        flower.start_superlink(simulation=True)
        flower.configure_simulation(2)
        summary = flower.run(cfg, tmp_path / "flower", timeout=RUN_TIMEOUT, app_dir=app)
    # reference: the in-process server in which client 1 never answers
    ref = build_federation(cfg)
    transport = DropClient(ref.clients, ref.runtime, client_id=1)
    for _ in range(cfg.fed.rounds):
        plans, encoded = ref.server.configure_round()
        ref.server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))
    assert torch.equal(values(tmp_path / "flower"), ref.server.values)
    assert summary["rejected_replies"] == cfg.fed.rounds
    for row in rows(tmp_path / "flower"):
        assert row["clients"] == [0] and "non-finite" in row["rejected"]["1"]


def test_tls_deployment_reaches_the_in_process_values_bit_for_bit(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg)
    tls = make_certificates(tmp_path / "certs")
    summary = run_deployment(cfg, tmp_path / "flower", tmp_path / "work", nodes=2, tls=tls, timeout=RUN_TIMEOUT)
    simulate(cfg, tmp_path / "inproc", progress=False)
    assert torch.equal(values(tmp_path / "flower"), values(tmp_path / "inproc"))
    assert summary["flower_nodes"] == 2 and summary["rejected_replies"] == 0
    connection = (tmp_path / "work" / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in connection and "insecure" not in connection


def test_killed_supernode_does_not_stop_the_run(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg)
    out = tmp_path / "flower"
    result: dict = {}
    with Flower(tmp_path / "work") as flower:
        flower.start_superlink()
        for index in range(2):
            flower.start_supernode(index, 2, node_settings(cfg, flower.start_worker(index)))

        def run() -> None:
            try:
                result["summary"] = flower.run(cfg, out, timeout=RUN_TIMEOUT, round_timeout=30.0)
            except Exception as exc:  # noqa: BLE001 (the main thread reports it)
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((out / "metrics.jsonl").exists() and rows(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rows(out), "round 1 never finished"
        flower.kill("supernode-1")
        flower.kill("worker-1")
        thread.join(RUN_TIMEOUT)
    assert "error" not in result, result.get("error")
    summary, metrics = result["summary"], rows(out)
    assert summary["rounds"] == 2 and len(metrics) == 2
    assert metrics[0]["clients"] == [0, 1]
    assert metrics[-1]["clients"] == [0] and metrics[-1]["rejected"] == {"1": "no reply"}
    assert torch.isfinite(values(out)).all()
    assert not any(proc.poll() is None for proc in flower.processes.values())
    assert os.path.exists(out / "patch.safetensors")


# With impostor=1 in its node config, a node also answers for client 0: it forges client 0's plan (the seeds
# are a function of the run seed) and fits it, so the forged reply is one the server would accept from client
# 0's own node.
IMPOSTOR_TRAIN = '''
@app.train()
def train(msg, context):
    plans = records.read_plans(msg.content)
    if context.node_config.get("impostor") and 0 not in plans and plans:
        plan = decode_plan(next(iter(plans.values())))
        run_seed = json.loads(str(context.state[records.STATE_CONFIG][records.CONFIG_KEY]))["run"]["seed"]
        seeds = np.asarray(step_seeds(run_seed, plan.round, 0, len(plan.seeds)), dtype=np.int64)
        msg.content[records.RECORD][records.plan_key(0)] = encode_plan(dataclasses.replace(plan, client_id=0, seeds=seeds))
    return client_app.fit(msg, context)
'''


def test_only_registered_nodes_join_and_none_answers_for_another_nodes_client(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, "fed.downlink=values")
    tls = make_certificates(tmp_path / "certs")
    auth = make_node_keys(tmp_path / "certs", nodes=2, num_clients=2)  # node-0 hosts client 0, node-1 client 1
    unregistered = make_node_keys(tmp_path / "unregistered", 1, 1).keys[0]
    unmapped = make_node_keys(tmp_path / "unmapped", 1, 1).keys[0]  # registered with Flower, not in the map
    app = custom_app(tmp_path / "impostor-app", IMPOSTOR_TRAIN)
    out = tmp_path / "flower"
    with Flower(tmp_path / "work", tls=tls, auth=auth) as flower:
        flower.start_superlink()  # --enable-supernode-auth; registers node-0 and node-1
        flower.register(unmapped)
        flower.start_supernode(0, 2, node_settings(cfg, flower.start_worker(0)))
        # node-1 says it hosts both clients (one partition) and answers for client 0 as well
        flower.start_supernode(1, 2, {**node_settings(cfg, flower.start_worker(1)), "partition-id": 0,
                                      "num-partitions": 1, "impostor": 1})
        claims_one = {"partition-id": 1, "num-partitions": 2}
        flower.start_supernode(2, 2, claims_one, private_key=unregistered.private)  # a key Flower never saw
        flower.start_supernode(3, 2, claims_one)  # no key: asks to self-register
        flower.start_supernode(4, 2, claims_one, private_key=unmapped.private)
        summary = flower.run(cfg, out, timeout=RUN_TIMEOUT, app_dir=app)
        refused = {name: flower.processes[name].poll() for name in ("supernode-2", "supernode-3")}
    logs = tmp_path / "work" / "logs"
    assert all(code not in (None, 0) for code in refused.values()), refused
    assert "Failed to activate SuperNode" in (logs / "supernode-2.log").read_text()
    assert "must be registered" in (logs / "supernode-3.log").read_text()
    # the ServerApp handshook only the mapped nodes; node-1's claim to client 0 was ignored
    assert summary["flower_nodes"] == 2 and summary["unmapped_nodes"] == 1 and summary["refused_claims"] == 1
    # every round node-0 trained client 0; node-1's reply (with its forged client-0 update) was refused whole
    assert summary["rejected_replies"] == cfg.fed.rounds and summary["forged_replies"] == cfg.fed.rounds
    for row in rows(out):
        assert row["clients"] == [0] and row["forged_replies"] == 1
        assert "node-1" in row["rejected"]["1"] and "answered for client(s) 0" in row["rejected"]["1"]
    ref = build_federation(cfg)  # the in-process server in which client 1 never answers
    transport = DropClient(ref.clients, ref.runtime, client_id=1)
    for _ in range(cfg.fed.rounds):
        plans, encoded = ref.server.configure_round()
        ref.server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))
    assert torch.equal(load_patch(out / "patch.safetensors").values, ref.server.values)
    assert json.loads((out / "summary.json").read_text())["engine"] == "flower"
