"""The in-process simulator: one model in memory, K clients, the round loop of ``fed/loop.py``.

``simulate`` is the driver both ``meerkat run`` and the Flower ServerApp call (Flower passes its own transport):
build the federation, open the run folder through the run shell, resume from a checkpoint, run the rounds,
write the patch and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from meerkat_fl import run as shell
from meerkat_fl.build import (
    ClientSide,
    Federation,
    build_client_side,
    build_federation,
    lr_schedule,
    partition_for,
)
from meerkat_fl.config import Config, flatten, method_name
from meerkat_fl.fed import checkpoint
from meerkat_fl.fed.loop import run_rounds
from meerkat_fl.fed.server import RoundResult
from meerkat_fl.fed.transport import InProcessTransport, Transport
from meerkat_fl.partition import format_histogram, save_partition
from meerkat_fl.patch import save_patch
from meerkat_fl.progress import Progress
from meerkat_fl.rundir import RunDir
from meerkat_fl.vp import GRADIP_LOG, gradip_records

__all__ = ["ClientSide", "Federation", "build_client_side", "build_federation", "evaluate", "partition_for",
           "simulate"]


def evaluate(fed: Federation, progress: Progress = False) -> dict[str, float]:
    """The task's metrics for the server's current values (written into the shared model)."""
    fed.params.write(fed.server.values)
    return fed.data.scorer.evaluate(fed.data.test, batch_size=fed.cfg.task.eval_batch_size, progress=progress)


def save_checkpoint(run: RunDir, fed: Federation, wall: float) -> None:
    tensors, state = fed.server.state_dict()
    tensors, state = checkpoint.pack(tensors, state, checkpoint.client_states_from(fed.clients), flatten(fed.cfg),
                                     {"wall_seconds": wall})
    run.save_checkpoint(tensors, state)


def load_checkpoint(run: RunDir, fed: Federation, allow_changed: Iterable[str] = ()) -> float:
    """Restore the server and every client; returns the wall seconds the run had used."""
    tensors, state = run.load_checkpoint()
    changed = set(allow_changed)
    flat = {k: v for k, v in flatten(fed.cfg).items() if k not in changed}
    saved = {k: v for k, v in state.get("config", {}).items() if k not in changed}
    checkpoint.check(tensors, {**state, "config": saved}, flat, str(run.path))
    fed.server.load_state_dict(tensors, state)
    states = checkpoint.unpack_clients(tensors, state["clients"], fed.params.size, fed.params.device)
    for cid, client in fed.clients.items():
        client.load_state(states[cid])
    return float(state["wall_seconds"])


def simulate(
    cfg: Config, out: str | Path, *, resume: bool = False, progress: Progress = True,
    transport: Transport | None = None, stop_after: int | None = None,
    on_built: Callable[[Federation], None] | None = None, overwrite: bool = False,
    allow_changed: Iterable[str] = (), zero_shot_from: Path | None = None,
) -> dict[str, Any]:
    """Run ``cfg.fed.rounds`` federated rounds; write the run folder; return the summary.

    ``stop_after`` ends after that many rounds, with a checkpoint there (``resume=True`` continues the run).
    ``on_built`` sees the federation once it is built (benchmarks reset their memory high-water mark there).
    ``overwrite`` replaces a run already in ``out``; ``allow_changed`` names config keys a resume may change
    (besides ``fed.rounds``; a benchmark continuing one run's prefix as another method).
    ``zero_shot_from``: a finished run folder of the same model, task and test rows whose zero-shot metrics
    this run shares rather than evaluating the same model again (``run.begin``; the demo's second method).
    """
    started = time.perf_counter()
    lr_schedule(cfg, cfg.fed.rounds, "fed.rounds")  # a bad warm-up fails before a run folder or a model exists
    run = shell.open_run(out, cfg, resume=resume, overwrite=overwrite)
    fed = build_federation(cfg, progress)
    if on_built is not None:
        on_built(fed)
    transport = transport or InProcessTransport(fed.clients, fed.runtime)
    wall_before, resumed_round = 0.0, None
    if resume and run.has_checkpoint():
        wall_before = load_checkpoint(run, fed, allow_changed)
        resumed_round = fed.server.round
    else:
        save_partition(fed.partition, run.path / "partition.json")
        (run.path / "partition.txt").write_text(format_histogram(fed.data.train_labels, fed.partition) + "\n")
    log_gradip = cfg.vp.log_gradip and fed.params.mask.pretrain_grad is not None  # GradIP, method doc section 4
    zero_shot = shell.begin(run, resumed_round=resumed_round, evaluate=(lambda: evaluate(fed, progress))
                            if cfg.run.zero_shot else None, zero_shot_from=zero_shot_from,
                            logs=("metrics.jsonl", GRADIP_LOG) if log_gradip else ("metrics.jsonl",),
                            environment=(cfg.model.device, cfg.model.dtype))
    kept = run.read_metrics()  # a resumed run's rounds so far: its bar starts from their eval and bytes

    def observe(result: RoundResult) -> None:  # before metrics.jsonl: a round's line means its GradIP lines exist
        if log_gradip:
            for record in gradip_records(result.round + 1, fed.params.mask, result.paths, noise=fed.params.noise,
                                         cosine=cfg.vp.gradip_cosine):
                run.append_metrics(record, name=GRADIP_LOG)

    rounds = cfg.fed.rounds
    run_rounds(fed.server, transport, rounds=rounds, eval_every=cfg.run.eval_every,
               checkpoint_every=cfg.run.checkpoint_every, evaluate=lambda: evaluate(fed, progress),
               log=run.append_metrics,
               checkpoint=lambda: save_checkpoint(run, fed, wall_before + time.perf_counter() - started),
               observe=observe, stop_after=stop_after, progress=progress, desc=method_name(cfg),
               last_eval=shell.final_metrics(kept, zero_shot),
               bytes_before=sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in kept))
    if fed.server.round < rounds:
        run.close()
        return {"interrupted_at_round": fed.server.round}

    save_patch(run.patch_path, fed.params.mask, fed.server.values,
               {"task": cfg.task.name, "rounds": str(rounds), "noise": fed.params.noise.name})
    rows = run.read_metrics()
    summary = {
        "method": method_name(cfg),
        "task": cfg.task.name,
        "task_loss": fed.data.scorer.loss_name,  # verbalizer | options | response
        "mask_kind": fed.params.mask.kind,
        "density": float(fed.params.mask.meta.get("density", 1.0)),
        "trainable_values": fed.params.size,
        "num_clients": cfg.fed.num_clients,
        "local_steps": cfg.fed.local_steps,
        "rounds": rounds,
        "partition": cfg.fed.partition,
        "downlink": cfg.fed.downlink,
        "seed_pool": cfg.fedkseed.pool_size,
        **shell.summary_metrics(fed.data.scorer.primary_metric, zero_shot, shell.final_metrics(rows, zero_shot)),
        "bytes_up_per_round": float(np.mean([r["bytes_up"] for r in rows])) if rows else 0.0,
        "bytes_down_per_round": float(np.mean([r["bytes_down"] for r in rows])) if rows else 0.0,
        "bytes_total": int(sum(r["bytes_up"] + r["bytes_down"] for r in rows)),
        "rejected_replies": fed.server.rejected_total,
        "wall_seconds": wall_before + time.perf_counter() - started,
    }
    run.write_summary(summary, cfg.model.device, cfg.model.dtype)
    return summary
