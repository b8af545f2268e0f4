"""The in-process simulator: one model in memory, K clients, the round loop on one screen."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meerkat_fl.build import TaskData, build_model, build_task_data, obtain_trainable
from meerkat_fl.config import Config, method_name
from meerkat_fl.fed.client import Client, ClientRuntime
from meerkat_fl.fed.seedpool import PoolModel, SeedPool
from meerkat_fl.fed.server import RoundResult, Server
from meerkat_fl.fed.strategies import make_strategy
from meerkat_fl.fed.transport import InProcessTransport, Transport
from meerkat_fl.partition import Partition, format_histogram, make_partition, save_partition
from meerkat_fl.patch import save_patch
from meerkat_fl.rundir import RunDir
from meerkat_fl.vp import GRADIP_LOG, gradip_records
from meerkat_fl.zo import MaskedParams, wants_noise_cache

log = logging.getLogger(__name__)


def partition_for(cfg: Config, labels: np.ndarray) -> Partition:
    params: dict[str, Any] = {}
    if cfg.fed.partition == "dirichlet":
        params = {"alpha": cfg.fed.alpha}
    elif cfg.fed.partition == "pathological":
        params = {"labels_per_client": cfg.fed.labels_per_client}
    elif cfg.fed.partition == "mixture":
        params = {"num_extreme": cfg.fed.num_extreme, "rest": cfg.fed.mixture_rest, "alpha": cfg.fed.alpha}
    return make_partition(labels, cfg.fed.partition, cfg.fed.num_clients, cfg.run.seed, **params)


@dataclass
class Federation:
    """Everything a run needs, built once from a config."""

    cfg: Config
    data: TaskData
    partition: Partition
    params: MaskedParams
    server: Server
    clients: dict[int, Client]
    runtime: ClientRuntime


@dataclass
class ClientSide:
    """What the clients need (model, data, mask, partition): built identically by the simulator and by
    every Flower node, which is why both reach the same values."""

    data: TaskData
    partition: Partition
    params: MaskedParams
    clients: dict[int, Client]
    runtime: ClientRuntime


def build_client_side(cfg: Config) -> ClientSide:
    loaded = build_model(cfg)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    mask = obtain_trainable(cfg, loaded)
    params = MaskedParams(loaded.model, mask, cache_noise=wants_noise_cache(cfg.zo.noise_cache, mask))
    initial = params.gather()
    partition = partition_for(cfg, data.train_labels)
    clients = {k: Client(k, idx, cfg.run.seed) for k, idx in enumerate(partition.clients)}
    runtime = ClientRuntime(params=params, scorer=data.scorer, train=data.train, initial_values=initial)
    return ClientSide(data, partition, params, clients, runtime)


def build_federation(cfg: Config) -> Federation:
    side = build_client_side(cfg)
    data, partition, params, clients, runtime = side.data, side.partition, side.params, side.clients, side.runtime
    mask, initial = params.mask, runtime.initial_values
    pool = None
    if cfg.fedkseed.pool_size:
        pool = SeedPool(cfg.run.seed, cfg.fedkseed.pool_size, mask, initial, sampling=cfg.fedkseed.sampling,
                        pro_clip=cfg.fedkseed.pro_clip)
    server = Server(
        mask, initial.clone(), make_strategy(cfg), client_sizes={k: c.num_examples for k, c in clients.items()},
        run_seed=cfg.run.seed, local_steps=cfg.fed.local_steps, lr=cfg.zo.lr, eps=cfg.zo.eps,
        batch_size=cfg.zo.batch_size, weighting=cfg.fed.weighting, downlink=cfg.fed.downlink,
        sample_fraction=cfg.fed.sample_fraction, sample_count=cfg.fed.sample_count, seed_pool=pool,
    )
    return Federation(cfg, data, partition, params, server, clients, runtime)


def evaluate(fed: Federation) -> float:
    fed.params.write(fed.server.values)
    return fed.data.scorer.accuracy(fed.data.test, batch_size=fed.cfg.task.eval_batch_size)


def round_record(result: RoundResult, seconds: float, accuracy: float | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "round": result.round + 1,
        "train_loss": result.train_loss,
        "bytes_up": sum(result.bytes_up.values()),
        "bytes_down": sum(result.bytes_down.values()),
        "seconds": seconds,
        "clients": result.accepted,
        "rejected": {str(k): v for k, v in result.rejected.items()},
        "bytes_up_by_client": {str(k): v for k, v in result.bytes_up.items()},
        "bytes_down_by_client": {str(k): v for k, v in result.bytes_down.items()},
        "train_loss_by_client": {str(k): v for k, v in result.train_loss_by_client.items()},
        **result.metrics,
    }
    if accuracy is not None:
        record["eval_accuracy"] = accuracy
    return record


def save_checkpoint(run: RunDir, fed: Federation, zero_shot: float | None, wall: float) -> None:
    tensors, state = fed.server.state_dict()
    for client in fed.clients.values():  # clients synced to the same round hold identical values: store once
        if client.values is not None:
            tensors.setdefault(f"synced.{client.synced_round}", client.values.clone())
        if client.pool is not None:
            tensors.setdefault(f"pool.{client.synced_round}.coefficients", torch.from_numpy(client.pool.coefficients))
            tensors.setdefault(f"pool.{client.synced_round}.accumulator", client.pool.accumulator.clone())
    state["clients"] = {str(cid): c.state_dict() for cid, c in fed.clients.items()}
    state["zero_shot_accuracy"], state["wall_seconds"] = zero_shot, wall
    run.save_checkpoint(tensors, state)


def load_checkpoint(run: RunDir, fed: Federation) -> tuple[float | None, float]:
    tensors, state = run.load_checkpoint()
    fed.server.load_state_dict(tensors, state)
    for cid, client in fed.clients.items():
        client_state = state["clients"][str(cid)]
        synced = client_state["synced_round"]
        values = tensors.get(f"synced.{synced}")
        pool = None
        if f"pool.{synced}.coefficients" in tensors and fed.server.seed_pool is not None:
            pool = PoolModel(tensors[f"pool.{synced}.coefficients"].numpy().copy(),
                             tensors[f"pool.{synced}.accumulator"].to(fed.params.device))
        client.load_state_dict(client_state, None if values is None else values.to(fed.params.device), pool)
    run.truncate_metrics(fed.server.round)
    if (run.path / GRADIP_LOG).exists():
        run.truncate_metrics(fed.server.round, name=GRADIP_LOG)
    return state["zero_shot_accuracy"], state["wall_seconds"]


def simulate(
    cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
    transport: Transport | None = None, stop_after: int | None = None,
    on_built: Callable[[Federation], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg.fed.rounds`` federated rounds; write the run folder; return the summary.

    ``stop_after`` ends after that many rounds, with a checkpoint there (``resume=True`` continues the run).
    ``on_built`` sees the federation once it is built (benchmarks reset their memory high-water mark there).
    """
    started = time.perf_counter()
    run = RunDir(out) if resume else RunDir.create(out, cfg)
    fed = build_federation(cfg)
    if on_built is not None:
        on_built(fed)
    transport = transport or InProcessTransport(fed.clients, fed.runtime)
    zero_shot, wall_before = None, 0.0
    if resume and run.has_checkpoint():
        zero_shot, wall_before = load_checkpoint(run, fed)
    elif not resume or not run.has_checkpoint():
        save_partition(fed.partition, run.path / "partition.json")
        (run.path / "partition.txt").write_text(format_histogram(fed.data.train_labels, fed.partition) + "\n")
        zero_shot = evaluate(fed) if cfg.run.zero_shot else None
        run.write_json("zero_shot.json", {"zero_shot_accuracy": zero_shot})
    if zero_shot is None and (run.path / "zero_shot.json").exists():
        zero_shot = run.read_json("zero_shot.json")["zero_shot_accuracy"]

    rounds, every = cfg.fed.rounds, cfg.run.eval_every or cfg.fed.rounds
    log_gradip = cfg.vp.log_gradip and fed.params.mask.pretrain_grad is not None  # GradIP, method doc section 4
    accuracy = zero_shot
    bar = tqdm(total=rounds, initial=fed.server.round, desc=method_name(cfg), unit="round", disable=not progress)
    while fed.server.round < rounds:
        if stop_after is not None and fed.server.round >= stop_after:
            break
        tic = time.perf_counter()
        plans, encoded = fed.server.configure_round()
        result = fed.server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))
        if log_gradip:  # before metrics.jsonl: a round's metrics line means its GradIP lines are written
            for record in gradip_records(result.round + 1, fed.params.mask, result.paths, cosine=cfg.vp.gradip_cosine):
                run.append_metrics(record, name=GRADIP_LOG)
        done = result.round + 1
        evaluated = None
        if done % every == 0 or done == rounds:
            evaluated = accuracy = evaluate(fed)
        record = round_record(result, time.perf_counter() - tic, evaluated)
        record.update(getattr(transport, "round_metrics", dict)())  # e.g. Flower's wire bytes per round
        run.append_metrics(record)
        if done % cfg.run.checkpoint_every == 0 or done == rounds:
            save_checkpoint(run, fed, zero_shot, wall_before + time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{result.train_loss:.4f}" if result.train_loss is not None else "-",
                        acc=f"{accuracy:.3f}" if accuracy is not None else "-")
    bar.close()
    if fed.server.round < rounds:  # stop_after: checkpoint where we stopped, so a resume continues from here
        if fed.server.round % cfg.run.checkpoint_every:
            save_checkpoint(run, fed, zero_shot, wall_before + time.perf_counter() - started)
        return {"interrupted_at_round": fed.server.round}

    save_patch(run.patch_path, fed.params.mask, fed.server.values, {"task": cfg.task.name, "rounds": str(rounds)})
    rows = run.read_metrics()
    summary = {
        "method": method_name(cfg),
        "task": cfg.task.name,
        "mask_kind": fed.params.mask.kind,
        "density": float(fed.params.mask.meta.get("density", 1.0)),
        "trainable_values": fed.params.size,
        "num_clients": cfg.fed.num_clients,
        "local_steps": cfg.fed.local_steps,
        "rounds": rounds,
        "partition": cfg.fed.partition,
        "downlink": cfg.fed.downlink,
        "seed_pool": cfg.fedkseed.pool_size,
        "zero_shot_accuracy": zero_shot,
        "final_eval_accuracy": accuracy,
        "bytes_up_per_round": float(np.mean([r["bytes_up"] for r in rows])) if rows else 0.0,
        "bytes_down_per_round": float(np.mean([r["bytes_down"] for r in rows])) if rows else 0.0,
        "bytes_total": int(sum(r["bytes_up"] + r["bytes_down"] for r in rows)),
        "rejected_replies": fed.server.rejected_total,
        "wall_seconds": wall_before + time.perf_counter() - started,
    }
    run.write_json("summary.json", summary)
    return summary
