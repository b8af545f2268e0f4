"""The config's rules: allowed values (defined by the registries that own them), ranges, bounds on keys that
drive memory, cross-key checks, and the method's resolution (``methods.resolve``). ``config.validate`` calls
``validate`` here; split from config.py, which keeps TOML and the override grammar (the dataclasses:
config_schema.py).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

from meerkat_fl.config import Config, flatten
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.messages import MAX_POOL_SIZE, MAX_ROUND
from meerkat_fl.fed.seedpool import SAMPLINGS
from meerkat_fl.fed.strategies import strategy_names
from meerkat_fl.fed.strategies.fedmezo import SIGNALS as FEDMEZO_SIGNALS
from meerkat_fl.local import FO_OPTIMIZERS
from meerkat_fl.masks import FILE_KINDS
from meerkat_fl.methods import method_names
from meerkat_fl.models import DEVICE_PATTERN
from meerkat_fl.schedule import KINDS as SCHEDULE_KINDS
from meerkat_fl.vp import CONTROLS as VP_CONTROLS

logger = logging.getLogger(__name__)
# bf16 weights round the two-point difference away at a small eps: ZO scalars against float32 on the same seeds
# and batches correlate 0.63 at eps 1e-3 and 0.994 at 1e-2 on an H200 (fp16: 0.990 at 1e-3; README, Performance,
# "On a GPU"; benchmarks/results/gpu_model.json). A recommendation, not a rule: a warning.
BF16_MIN_EPS = 1e-2

# Allowed values; those of methods, strategies, mask kinds, samplings, signals and controls are defined by the
# registries and modules that own them.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": method_names(),
    "model.dtype": ("float32", "fp32", "bf16", "bfloat16", "fp16", "float16"),
    "task.eval_split": ("test", "validation"),
    "mask.kind": FILE_KINDS,
    "mask.scope": ("linear", "all"),
    "mask.selection": ("per_tensor", "global"),
    "mask.score": ("fisher", "grad_squared"),
    "fed.strategy": strategy_names(),
    "fed.partition": ("iid", "dirichlet", "pathological", "mixture"),
    "fed.mixture_rest": ("dirichlet", "iid"),
    "fed.weighting": ("data_size", "uniform"),
    "fed.downlink": ("values", "scalars", "pool"),
    "fed.clip": ("none", "norm", "scalar"),
    "fedkseed.sampling": SAMPLINGS,
    "zo.noise_cache": ("auto", "on", "off"),
    "fo.optimizer": tuple(FO_OPTIMIZERS),
    "zo.noise": ("gaussian", "rademacher"),
    "zo.noise_generator": ("torch_cpu", "philox"),
    "lr_schedule.kind": SCHEDULE_KINDS,
    "fedmezo.signal": FEDMEZO_SIGNALS,
    "vp.control": VP_CONTROLS,
}
POSITIVE = {
    "zo.eps", "zo.batch_size", "task.max_length", "task.eval_batch_size", "task.validation_size",
    "fed.num_clients", "fed.rounds",
    "fed.local_steps", "mask.calibration_sequences", "mask.calibration_seq_len", "mask.calibration_batch_size",
    "fed.alpha", "run.checkpoint_every", "fed.labels_per_client", "vp.calibration_steps", "vp.recheck_every",
    "lora.rank", "lora.alpha", "fedkseed.pro_clip", "fed.clip_factor", "fed.max_abs_scalar",
}
NON_NEGATIVE = {"zo.lr", "fo.lr", "train.steps", "train.eval_every", "run.eval_every", "fed.num_extreme",
                "vp.quiet_factor", "vp.rho_later", "vp.rho_quiet", "fedmezo.lr_scale", "run.seed", "mask.seed",
                "fedkseed.pool_size", "lr_schedule.warmup", "lr_schedule.final"}  # final: also <= 1, below
FRACTIONS = {"mask.density", "fed.sample_fraction"}  # in (0, 1]
# Optional keys (None = unset, the task's or the data's own size) that, when set, must be >= 1.
POSITIVE_OR_NONE = {"task.train_size", "task.eval_size", "task.max_prompt_length", "task.max_response_length",
                    "task.max_new_tokens", "fed.sample_count"}

# [choice] Upper bounds on the keys that drive memory (or must fit the wire format), so that a typo fails at
# once instead of allocating without limit (zo.batch_size = 100000 took 8.8 GB in 30 s). Each is far above
# any setting the paper or its baselines use (batch 16, 64-512 tokens, 10-100 clients, T = 10-200, K = 4096);
# raise one here if a real run needs it. README, "Configuration" lists them.
MAX_BATCH = 4096  # examples in one forward pass
MAX_TOKENS = 32768  # tokens per example, prompt, response or generation
MAX_CLIENTS = 10_000  # simulated clients: each holds a partition, a state and a reply per round
MAX_STEPS = 10_000  # local steps (seeds and scalars per client and round) or GradIP calibration steps
MAX_SEED = 2**63 - 1  # seeds travel as int64
LIMITS: dict[str, int] = {
    "zo.batch_size": MAX_BATCH, "task.eval_batch_size": MAX_BATCH, "mask.calibration_batch_size": MAX_BATCH,
    "task.max_length": MAX_TOKENS, "task.max_prompt_length": MAX_TOKENS, "task.max_response_length": MAX_TOKENS,
    "task.max_new_tokens": MAX_TOKENS, "mask.calibration_seq_len": MAX_TOKENS,
    "mask.calibration_sequences": 65_536,
    "fed.num_clients": MAX_CLIENTS, "fed.local_steps": MAX_STEPS, "vp.calibration_steps": MAX_STEPS,
    "train.steps": 1_000_000,  # centralised steps: their seeds are drawn up front (MeZO runs 20k-100k)
    "fed.rounds": MAX_ROUND, "fedkseed.pool_size": MAX_POOL_SIZE, "lora.rank": 4096,
    "run.seed": MAX_SEED, "mask.seed": MAX_SEED, "lr_schedule.warmup": 1_000_000,
}


def validate(cfg: Config) -> Config:
    """Resolve the method (in place: ``methods.resolve``), check choices and ranges; returns ``cfg`` or raises
    ConfigError naming the key."""
    _check_choices(flatten(cfg))
    resolve_method(cfg)
    flat = flatten(cfg)
    for key, value in flat.items():  # NaN passes every range check below; inf trains nothing
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    for key in sorted(POSITIVE):
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    for key in sorted(NON_NEGATIVE):
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    for key in sorted(POSITIVE_OR_NONE):
        if flat[key] is not None and flat[key] < 1:
            raise ConfigError(f"{key}: must be >= 1 or none, got {flat[key]!r}")
    for key, limit in LIMITS.items():
        if flat[key] is not None and flat[key] > limit:
            raise ConfigError(f"{key} = {flat[key]} exceeds the limit {limit} (the bounds on memory-driving keys: "
                              "README, Configuration)")
    if not DEVICE_PATTERN.fullmatch(cfg.model.device):
        raise ConfigError(f"model.device: expected cpu, cuda, cuda:N or mps, got {cfg.model.device!r}")
    for key in sorted(FRACTIONS):
        if not 0.0 < flat[key] <= 1.0:
            raise ConfigError(f"{key}: must be in (0, 1], got {flat[key]!r}")
    if not 0.0 <= cfg.lr_schedule.final <= 1.0:
        raise ConfigError(f"lr_schedule.final: must be in [0, 1] (a fraction of the lr), got {cfg.lr_schedule.final!r}")
    if cfg.fed.sample_count is not None and cfg.fed.sample_count > cfg.fed.num_clients:
        raise ConfigError(f"fed.sample_count: must be in [1, fed.num_clients], got {cfg.fed.sample_count}")
    _validate_vp(cfg)
    _validate_lora(cfg)
    _validate_fedkseed(cfg)
    _warn_low_precision(cfg)
    return cfg


def _warn_low_precision(cfg: Config) -> None:
    """A zeroth-order method on bf16 weights with an eps below BF16_MIN_EPS: say so (a logged warning)."""
    from meerkat_fl import config, methods

    zeroth_order = methods.get_method(config.method_name(cfg)).lr_key == "zo.lr"
    if zeroth_order and cfg.model.dtype in ("bf16", "bfloat16") and cfg.zo.eps < BF16_MIN_EPS:
        _warn_once(f"model.dtype={cfg.model.dtype} with zo.eps={cfg.zo.eps:g}: the two-point difference is mostly "
                   "bf16 rounding (on an H200 its scalars correlate 0.63 with float32's at eps 1e-3); use "
                   f"zo.eps>={BF16_MIN_EPS:g}, model.dtype=fp16 or float32 (README, Performance, On a GPU)")


@functools.cache
def _warn_once(message: str) -> None:
    """Log a config warning once per process (a run validates its config more than once)."""
    logger.warning(message)


def _check_choices(flat: Mapping[str, Any]) -> None:
    for key, choices in CHOICES.items():
        if flat[key] is not None and flat[key] not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {flat[key]!r}")


def _validate_lora(cfg: Config) -> None:
    """LoRA settings are checked whatever the mask kind (a saved config stays loadable when switched to lora)."""
    lora = cfg.lora
    if not lora.targets or any(not t.strip(". ") for t in lora.targets):
        raise ConfigError(f"lora.targets: must be a non-empty list of module names, got {list(lora.targets)!r}")
    if cfg.mask.kind == "lora" and cfg.mask.path is not None:
        raise ConfigError("mask.path cannot be used with mask.kind=lora: the adapters come from the [lora] section")


def _validate_fedkseed(cfg: Config) -> None:
    """The pool downlink and Pro sampling need a pool (its size's range is in the tables above)."""
    if cfg.fedkseed.pool_size == 0 and cfg.fed.downlink == "pool":
        raise ConfigError("fed.downlink=pool needs a seed pool: set fedkseed.pool_size (the paper uses 4096)")
    if cfg.fedkseed.pool_size == 0 and cfg.fedkseed.sampling != "uniform":
        raise ConfigError("fedkseed.sampling=pro needs a seed pool: set fedkseed.pool_size (the paper uses 4096)")


def _validate_vp(cfg: Config) -> None:
    """Meerkat-vp's windows must fit in the calibration trajectory, and GradIP needs a sensitive mask."""
    vp = cfg.vp
    for key, (start, end) in (("vp.early_window", vp.early_window), ("vp.late_window", vp.late_window)):
        if not 0 <= start < end <= vp.calibration_steps:
            raise ConfigError(f"{key}: must be [start, end) with 0 <= start < end <= vp.calibration_steps "
                              f"({vp.calibration_steps}), got {[start, end]}")
    if cfg.fed.strategy == "meerkat_vp" and cfg.mask.kind != "sensitive" and cfg.mask.path is None:
        raise ConfigError(f"fed.strategy=meerkat_vp needs GradIP, i.e. mask.kind=sensitive, got {cfg.mask.kind!r}")


def _set_dotted(cfg: Config, key: str, value: Any) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def resolve_method(cfg: Config) -> Config:
    """Apply ``cfg.method``'s fixed settings and defaults in place (``methods.resolve``); an explicit method
    stays recorded, an inferred one is not written (so an old config's flags keep their meaning)."""
    from meerkat_fl import methods

    _, updates = methods.resolve(flatten(cfg), flatten(Config()), cfg.method)
    for key, value in updates.items():
        _set_dotted(cfg, key, value)
    return cfg


