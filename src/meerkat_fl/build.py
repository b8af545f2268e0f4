"""Builders: turn a Config into the objects everything else takes as plain arguments.

Model, task data (bound to the model as a Scorer) and mask (or LoRA adapters), the partition and the federation
(server, clients and the client side every Flower node builds identically). Used by `meerkat finetune`, the
simulator and the Flower apps.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meerkat_fl.config import TASK_OPTIONS, Config, MaskConfig, TaskConfig
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.fed.client import Client, ClientRuntime
from meerkat_fl.fed.messages import PlanLimits
from meerkat_fl.fed.robust import ScalarClip
from meerkat_fl.fed.seedpool import SeedPool
from meerkat_fl.fed.server import Server
from meerkat_fl.fed.strategies import make_strategy
from meerkat_fl.lora import add_lora
from meerkat_fl.masks import Mask, build_mask, calibration_batches, load_mask, save_mask
from meerkat_fl.models import LoadedModel, default_cache_dir, load_model
from meerkat_fl.noise import noise_source
from meerkat_fl.partition import Partition, make_partition
from meerkat_fl.progress import Progress
from meerkat_fl.schedule import LRSchedule
from meerkat_fl.tasks import EncodedSplit, Scorer, Split, TaskProtocol, get_task
from meerkat_fl.zo import MaskedParams, wants_noise_cache

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """A task's encoded train and evaluation splits and the task bound to the model.

    `scorer.loss(batch)` is what training calls; `scorer.evaluate(test)` gives the metrics by name.
    """

    train: EncodedSplit
    test: EncodedSplit
    train_labels: np.ndarray  # the training rows' partition labels (class, or category)
    scorer: Scorer


def subsample(data: Split, size: int | None, seed: int) -> Split:
    """A seeded subsample of ``size`` examples (all of them when size is None or larger)."""
    if size is None or size >= len(data):
        return data
    order = np.random.default_rng([seed, len(data)]).permutation(len(data))[:size]
    return data.subset(np.sort(order))


def hold_out(data: Split, size: int) -> tuple[Split, Split]:
    """(rest, validation): a fixed slice of ``size`` examples held out of a training split, independent of the
    run seed so every run tunes on the same examples."""
    if not 0 < size < len(data):
        raise DataError(f"validation_size {size} must be between 1 and the training split's {len(data) - 1}")
    order = np.random.default_rng([0x7A11D, len(data)]).permutation(len(data))
    return data.subset(np.sort(order[size:])), data.subset(np.sort(order[:size]))


def build_task(task_cfg: TaskConfig) -> TaskProtocol:
    """The named task with the task settings the config sets (TASK_OPTIONS; unset ones keep the task's own)."""
    options = {key: getattr(task_cfg, key) for key in TASK_OPTIONS if getattr(task_cfg, key) not in (None, ())}
    return get_task(task_cfg.name).configure(options)


def train_rows(task_cfg: TaskConfig, seed: int) -> tuple[TaskProtocol, Split, Split | None]:
    """The run's training rows, before encoding: what every client's shard is drawn from, and the validation rows
    held out of them when ``eval_split = "validation"`` (else None: the test split is read separately).

    `meerkat partition` and the benchmarks that rebuild a run's partition read the same rows through this, so
    they need no test split."""
    task = build_task(task_cfg)
    train = task.load("train", path=task_cfg.train_path, data_dir=task_cfg.data_dir, hub=task_cfg.hub)
    held = None
    if task_cfg.eval_split == "validation":
        train, held = hold_out(train, task_cfg.validation_size)
    train = subsample(train, task_cfg.train_size, seed)
    if len(train) == 0:
        raise DataError(f"task {task_cfg.name}: the train split is empty")
    return task, train, held


def load_splits(task_cfg: TaskConfig, seed: int) -> tuple[TaskProtocol, Split, Split]:
    """The run's train and test rows, before encoding: what every client's shard and every score is drawn from."""
    task, train, test = train_rows(task_cfg, seed)
    if test is None:
        test = task.load("test", path=task_cfg.test_path, data_dir=task_cfg.data_dir, hub=task_cfg.hub)
    test = subsample(test, task_cfg.eval_size, seed + 1)
    if len(test) == 0:
        raise DataError(f"task {task_cfg.name}: the {task_cfg.eval_split} split is empty")
    return task, train, test


def build_task_data(task_cfg: TaskConfig, loaded: LoadedModel, seed: int) -> TaskData:
    task, train, test = load_splits(task_cfg, seed)
    return TaskData(
        train=task.encode(loaded.tokenizer, train, task_cfg.max_length),
        test=task.encode(loaded.tokenizer, test, task_cfg.max_length),
        train_labels=np.asarray(train.partition_labels),
        scorer=Scorer(task, loaded.model),
    )


def mask_key(mask_cfg: MaskConfig, fingerprint: str) -> str:
    """Cache key of a built mask: everything that determines it."""
    calib = mask_cfg.calibration
    if calib is not None and Path(calib).exists():
        files = sorted(Path(calib).glob("*.txt")) if Path(calib).is_dir() else [Path(calib)]
        calib = [(f.name, f.stat().st_size) for f in files]
    blob = json.dumps(
        [fingerprint, mask_cfg.kind, mask_cfg.density, mask_cfg.scope, mask_cfg.selection, mask_cfg.score,
         mask_cfg.seed, calib, mask_cfg.calibration_sequences, mask_cfg.calibration_seq_len],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def obtain_mask(mask_cfg: MaskConfig, loaded: LoadedModel, cache_dir: Path | None = None,
                progress: Progress = False) -> Mask:
    """Load ``mask.path`` (checked against the model), or build the mask once and cache it (``progress``: a bar
    over the calibration batches while building)."""
    if mask_cfg.path is not None:
        return load_mask(mask_cfg.path, loaded.fingerprint)
    cache = (cache_dir or default_cache_dir()) / "masks" / f"{mask_cfg.kind}-{mask_key(mask_cfg, loaded.fingerprint)}.safetensors"
    if cache.exists():
        return load_mask(cache, loaded.fingerprint)
    mask = make_mask(mask_cfg, loaded, progress=progress)
    save_mask(mask, cache)
    return mask


def obtain_trainable(cfg: Config, loaded: LoadedModel, progress: Progress = False) -> Mask:
    """The trainable coordinates a config describes: for ``mask.kind = "lora"``, LoRA adapters injected into
    ``loaded.model`` in place (A drawn from ``run.seed``, so every party builds the same) and the mask over
    them; otherwise the sparse or dense mask of the base weights (``obtain_mask``, with its ``progress``)."""
    if cfg.mask.kind != "lora":
        return obtain_mask(cfg.mask, loaded, progress=progress)
    lora = cfg.lora
    return add_lora(loaded.model, fingerprint=loaded.fingerprint, rank=lora.rank, alpha=lora.alpha,
                    targets=lora.targets, seed=cfg.run.seed)


def make_mask(mask_cfg: MaskConfig, loaded: LoadedModel, progress: Progress = False) -> Mask:
    """Build the mask a MaskConfig describes (sensitive masks read the calibration text; ``progress``: a bar
    over its batches)."""
    scope = mask_cfg.scope or ("all" if mask_cfg.kind == "dense" else "linear")
    calibration = []
    meta = {}
    if mask_cfg.kind == "sensitive":
        if mask_cfg.calibration is None:
            raise DataError(
                "a sensitive mask needs calibration text: set mask.calibration to a text file, "
                "or task.data_dir / MEERKAT_DATA_DIR to a folder holding calibration/wikitext-2"
            )
        calibration = calibration_batches(
            loaded.tokenizer,
            mask_cfg.calibration,
            num_sequences=mask_cfg.calibration_sequences,
            seq_len=mask_cfg.calibration_seq_len,
            batch_size=mask_cfg.calibration_batch_size,
        )
        tokens = sum(int(b.numel()) for b in calibration)
        meta = {"calibration": str(mask_cfg.calibration), "calibration_tokens": str(tokens)}
        log.info("building a sensitive mask from %d calibration tokens", tokens)
    return build_mask(
        loaded.model,
        mask_cfg.kind,
        mask_cfg.density,
        fingerprint=loaded.fingerprint,
        scope=scope,
        selection=mask_cfg.selection,
        calibration=calibration,
        score=mask_cfg.score,
        seed=mask_cfg.seed,
        meta=meta,
        progress=progress,
    )


def build_model(cfg: Config) -> LoadedModel:
    return load_model(cfg.model.source, device=cfg.model.device, dtype=cfg.model.dtype)


def partition_for(cfg: Config, labels: np.ndarray) -> Partition:
    unlabelled = int(np.sum(np.asarray(labels) < 0))  # rows without a category (protocol: label -1)
    if unlabelled and cfg.fed.partition != "iid":
        raise ConfigError(f"fed.partition={cfg.fed.partition} splits clients by category, but {unlabelled} training "
                          f"rows of task {cfg.task.name!r} have none: use fed.partition=iid")
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


def lr_schedule(cfg: Config, length: int, length_key: str) -> LRSchedule:
    """The run's lr schedule (``[lr_schedule]``, ranges validated by config_checks) over ``length`` units (rounds
    or steps, set by ``length_key``); a warm-up as long as the run is an error (the lr would never reach its value)."""
    sched = cfg.lr_schedule
    if sched.warmup and sched.warmup >= length:
        raise ConfigError(f"lr_schedule.warmup = {sched.warmup} must be shorter than the run ({length_key} = {length}): "
                          "the lr would never reach its configured value")
    return LRSchedule(sched.kind, float(sched.final), int(sched.warmup))


def build_client_side(cfg: Config, progress: Progress = False) -> ClientSide:
    """``progress``: a bar while a sensitive mask is built (no cached one)."""
    loaded = build_model(cfg)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    mask = obtain_trainable(cfg, loaded, progress=progress)
    params = MaskedParams(loaded.model, mask, cache_noise=wants_noise_cache(cfg.zo.noise_cache, mask),
                          noise=noise_source(cfg.zo.noise_generator, cfg.zo.noise))
    initial = params.gather()
    partition = partition_for(cfg, data.train_labels)
    limits = PlanLimits(max_batch_size=cfg.zo.batch_size, max_local_steps=cfg.fed.local_steps)
    clients = {k: Client(k, idx, cfg.run.seed, limits) for k, idx in enumerate(partition.clients)}
    runtime = ClientRuntime(params=params, scorer=data.scorer, train=data.train, initial_values=initial)
    return ClientSide(data, partition, params, clients, runtime)


def build_federation(cfg: Config, progress: Progress = False) -> Federation:
    """``progress``: as ``build_client_side``'s."""
    side = build_client_side(cfg, progress)
    data, partition, params, clients, runtime = side.data, side.partition, side.params, side.clients, side.runtime
    mask, initial = params.mask, runtime.initial_values
    pool = None
    if cfg.fedkseed.pool_size:
        pool = SeedPool(cfg.run.seed, cfg.fedkseed.pool_size, mask, initial, sampling=cfg.fedkseed.sampling,
                        pro_clip=cfg.fedkseed.pro_clip, noise=params.noise)
    server = Server(
        mask, initial.clone(), make_strategy(cfg), client_sizes={k: c.num_examples for k, c in clients.items()},
        run_seed=cfg.run.seed, local_steps=cfg.fed.local_steps, lr=cfg.zo.lr, eps=cfg.zo.eps,
        batch_size=cfg.zo.batch_size, weighting=cfg.fed.weighting, downlink=cfg.fed.downlink,
        sample_fraction=cfg.fed.sample_fraction, sample_count=cfg.fed.sample_count, seed_pool=pool,
        max_abs_scalar=cfg.fed.max_abs_scalar, clip=ScalarClip(cfg.fed.clip, cfg.fed.clip_factor),
        noise=params.noise, lr_schedule=lr_schedule(cfg, cfg.fed.rounds, "fed.rounds"),
        rounds=cfg.fed.rounds,
    )
    return Federation(cfg, data, partition, params, server, clients, runtime)
