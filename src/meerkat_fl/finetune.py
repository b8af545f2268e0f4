"""Centralised MeZO-style fine-tuning (sparse or dense): the baseline every user runs first."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from meerkat_fl import run as shell
from meerkat_fl.build import build_model, build_task_data, lr_schedule, obtain_trainable
from meerkat_fl.config import Config, flatten
from meerkat_fl.fed import checkpoint
from meerkat_fl.local import DataPointer, local_train, step_seeds
from meerkat_fl.noise import check_noise, noise_source
from meerkat_fl.patch import save_patch
from meerkat_fl.progress import Progress, bar, postfix
from meerkat_fl.rundir import EVAL, prefixed
from meerkat_fl.zo import MaskedParams, wants_noise_cache

log = logging.getLogger(__name__)


def finetune(cfg: Config, out: str | Path, *, resume: bool = False, progress: Progress = True,
             overwrite: bool = False) -> dict[str, Any]:
    """Train on one machine for ``cfg.train.steps`` ZO steps; write metrics, a patch and a summary.

    Checkpoints at every evaluation; ``resume=True`` continues from the last one. The run folder follows the
    run shell's rules (``meerkat_fl.run``), as ``meerkat run``'s does.
    """
    started = time.perf_counter()
    schedule = lr_schedule(cfg, cfg.train.steps, "train.steps")  # a bad warm-up fails before any work
    run = shell.open_run(out, cfg, resume=resume, overwrite=overwrite)
    loaded = build_model(cfg)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    mask = obtain_trainable(cfg, loaded, progress)
    noise = noise_source(cfg.zo.noise_generator, cfg.zo.noise)
    params = MaskedParams(loaded.model, mask, cache_noise=wants_noise_cache(cfg.zo.noise_cache, mask), noise=noise)
    values = params.gather()
    pointer = DataPointer(len(data.train), seed=cfg.run.seed)
    device = params.device

    def batch_loss(indices: np.ndarray) -> float:
        return data.scorer.loss(data.train.batch(indices, device))

    def evaluate() -> dict[str, float]:
        return data.scorer.evaluate(data.test, batch_size=cfg.task.eval_batch_size, progress=progress)

    start, skipped, resumed = 0, 0, None
    if resume and run.has_checkpoint():
        tensors, state = run.load_checkpoint()
        checkpoint.check(tensors, state, flatten(cfg), str(run.path), length_key="train.steps")
        check_noise(noise.name, state.get("noise"), f"{run.path}'s checkpoint")  # its later steps must match
        values = tensors["values"].to(device)
        params.write(values)
        pointer.load_state(state["pointer"])
        start = resumed = state["step"]
        skipped = state["skipped"]
    zero_shot = shell.begin(run, resumed_round=resumed, evaluate=evaluate if cfg.run.zero_shot else None,
                            step_key="step", environment=(cfg.model.device, cfg.model.dtype))
    if resumed is None and zero_shot is not None:
        run.append_metrics({"step": 0, **prefixed(EVAL, zero_shot)})

    steps = cfg.train.steps
    seeds = step_seeds(cfg.run.seed, 0, 0, steps)
    every = cfg.train.eval_every or steps
    last = shell.final_metrics(run.read_metrics(), zero_shot)  # a resumed run's bar starts from its last eval
    steps_bar = bar(steps, "finetune", "step", progress, initial=start)
    for step in range(start, steps):
        lr = schedule.lr(cfg.zo.lr, step, steps)
        (result,) = local_train(
            params, values, seeds[step : step + 1], lr=lr, eps=cfg.zo.eps,
            batch_loss=batch_loss, pointer=pointer, batch_size=cfg.zo.batch_size,
        )
        skipped += int(result.skipped)
        record: dict[str, Any] = {"step": step + 1, "train_loss": result.loss, "scalar": result.scalar}
        if not schedule.constant:
            record["lr"] = lr
        evaluated = (step + 1) % every == 0 or step + 1 == steps
        if evaluated:
            last = evaluate()
            record.update(prefixed(EVAL, last))
        run.append_metrics(record)  # before the checkpoint: a checkpoint's step always has its line
        if evaluated:
            run.save_checkpoint(*checkpoint.pack({"values": values}, {"step": step + 1, "pointer": pointer.state(),
                                                                      "skipped": skipped, "noise": noise.name}, {},
                                                     flatten(cfg), {}))
        steps_bar.update(1)
        steps_bar.set_postfix(postfix(result.loss, last))
    steps_bar.close()
    if skipped:
        log.warning("%d of %d steps were skipped because the loss was not finite", skipped, steps)

    save_patch(run.patch_path, mask, values, {"task": cfg.task.name, "steps": str(steps), "noise": noise.name})
    rows = run.read_metrics()
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    summary = {
        "method": "mezo" if mask.kind == "dense" else f"mezo_{mask.kind}",
        "task": cfg.task.name,
        "task_loss": data.scorer.loss_name,  # verbalizer | options | response
        "mask_kind": mask.kind,
        "density": float(mask.meta.get("density", 1.0)),
        "trainable_values": mask.size,
        "steps": steps,
        **shell.summary_metrics(data.scorer.primary_metric, zero_shot, shell.final_metrics(rows, zero_shot)),
        "first_train_loss": float(np.mean(losses[:10])) if losses else None,
        "last_train_loss": float(np.mean(losses[-10:])) if losses else None,
        "skipped_steps": skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(summary, cfg.model.device, cfg.model.dtype)
    return summary
