"""Config is data: one typed dataclass tree, loaded from TOML, overridden by dotted ``key=value`` strings.

The same grammar serves ``meerkat run --set fed.rounds=10`` and Flower's ``--run-config``. Every
unknown key or wrongly typed value raises ConfigError naming the key. Only the builders (cli, simulate,
the Flower server app) read a Config; everything below takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from meerkat_fl.errors import ConfigError


@dataclass
class ModelConfig:
    source: str = "smollm2"  # "smollm2" (embedded), "tiny" (tests), a .gguf file, a local dir or a hub id
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bf16 | fp16; trainable values keep a float32 master copy


@dataclass
class TaskConfig:
    name: str = "sst2"
    data_dir: str | None = None  # a folder laid out like shared/data; default: $MEERKAT_DATA_DIR
    train_path: str | None = None  # explicit local file for the training split (CSV/TSV/JSONL)
    test_path: str | None = None  # explicit local file for the evaluation split
    # (paths: .csv/.tsv/.jsonl/.json, optionally .gz, or a `datasets` save_to_disk folder)
    hub: str | None = None  # Hugging Face dataset ("org/name" or "org/name:config") instead of the task's own
    max_length: int = 64  # tokens per example (prompt truncated from the left)
    train_size: int | None = None  # seeded subsample of the training split; None = all
    eval_size: int | None = 500  # seeded subsample of the evaluation split; None = all
    eval_batch_size: int = 32
    # test: evaluate on the task's test split. validation: on a fixed slice held out of the training split
    # (the same for every run seed), for tuning hyper-parameters without touching the test split.
    eval_split: str = "test"
    validation_size: int = 500  # examples held out of the training split when eval_split = "validation"
    # The task's own settings (TASK_OPTIONS; unset = the task's default; a task refuses those it does not take;
    # None, not a default value, so checkpoints written before a key existed still match).
    loss: str | None = None  # classification: verbalizer (default) | options; generation: response
    template: str | None = None  # generation: alpaca (default) | chat (the tokenizer's chat template)
    max_prompt_length: int | None = None  # generation: prompt tokens (cut from the left); default: what is left
    max_response_length: int | None = None  # generation: response tokens incl. EOS; default max_length // 2
    max_new_tokens: int | None = None  # generation: greedy tokens per row at evaluation (ROUGE-L); default 64
    columns: tuple[str, ...] | None = None  # generation: "field=column" for a file's columns, e.g. ["response=output"]
    categories: tuple[str, ...] | None = None  # generation: category names of a local file (partition labels)


# TaskConfig keys that configure the task itself (passed to its `configure` when set).
TASK_OPTIONS = ("loss", "template", "max_prompt_length", "max_response_length", "max_new_tokens", "columns",
                "categories")


@dataclass
class MaskConfig:
    kind: str = "sensitive"  # sensitive | random | magnitude | dense | lora (LoRA adapters: see [lora])
    density: float = 1e-3
    scope: str | None = None  # linear | all; None = linear for sparse kinds, all for dense
    selection: str = "per_tensor"  # per_tensor | global
    path: str | None = None  # an existing mask file; None = build (and cache under the run folder)
    calibration: str | None = None  # text file or folder; None = <data_dir>/calibration/wikitext-2
    calibration_sequences: int = 32
    calibration_seq_len: int = 128
    calibration_batch_size: int = 4
    score: str = "fisher"  # fisher (mean squared grad) | grad_squared (square of mean grad) [choice]
    seed: int = 0  # random mask only


@dataclass
class LoraConfig:
    """LoRA-FedZO (``mask.kind = "lora"``): ZO on LoRA adapters injected with PEFT, not on a mask of base weights.

    The other mask keys are then ignored. A is drawn from ``run.seed`` (every party builds the same adapters),
    B starts at zero.
    """

    rank: int = 8
    alpha: float = 16.0  # scaling alpha / rank
    # Decoder-block linears (or an untied lm_head) to adapt, by module name or dotted suffix (PEFT's
    # target_modules) [choice: q and v, as MeZO's LoRA runs and LoRA-FedZO use]. Llama-style names: q_proj k_proj
    # v_proj o_proj gate_proj ...
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class ZOConfig:
    lr: float = 2e-4
    eps: float = 1e-3
    batch_size: int = 16
    noise_cache: str = "auto"  # auto | on | off: keep a step's noise between its 3 uses (auto: sparse masks)
    noise: str = "gaussian"  # gaussian (the paper's) | rademacher (±1, SPSA's original)
    # torch_cpu (CPU torch.Generator, fast on CPU, what every earlier run drew) | philox (counter-based, drawn
    # on the model's device with the same bits on CPU and CUDA: for GPUs). Part of the run's identity (noise.py).
    noise_generator: str = "torch_cpu"


@dataclass
class FOConfig:
    """The first-order upper bound (``method = "fedavg_fo"``): local backprop steps on the mask's coordinates.

    T, the batch size (``zo.batch_size``) and the downlink are shared with every method; zo.lr and zo.eps do
    not apply to backprop steps.
    """

    optimizer: str = "sgd"  # sgd | adam (torch's, a fresh optimiser each round)
    # [choice] probed, not tuned, on the demo setting (SmolLM2-135M, Meerkat's 1e-3 mask, 3 rounds): sgd 3e-3 ->
    # 0.700 accuracy; sgd 1e-2 -> 0.655 and adam 1e-3 -> 0.660, both with a loss spike in round 3
    lr: float = 3e-3


@dataclass
class TrainConfig:
    """Centralised (single-machine) MeZO-style fine-tuning: `meerkat finetune`."""

    steps: int = 100
    eval_every: int = 50  # steps; 0 = only at the end


@dataclass
class FedConfig:
    strategy: str = "meerkat"  # meerkat | fedmezo | meerkat_vp (server rule; the mask picks sparse/dense)
    num_clients: int = 10
    sample_fraction: float = 1.0  # share of clients sampled per round
    sample_count: int | None = None  # overrides sample_fraction when set
    rounds: int = 20
    local_steps: int = 10  # T
    partition: str = "dirichlet"  # iid | dirichlet | pathological | mixture
    alpha: float = 0.5
    labels_per_client: int = 1
    num_extreme: int = 0  # mixture: single-label clients
    mixture_rest: str = "dirichlet"  # mixture: how the other clients split the rest
    weighting: str = "data_size"  # data_size | uniform (p_k)
    # values (new masked values) | scalars (every client's seed/scalar list) | pool (the seed pool's changed
    # coefficients: at most fedkseed.pool_size numbers; needs a pool); None: the method's default (values, or
    # pool for FedKSeed), set by validate
    downlink: str | None = None
    # How far one accepted reply can move the model (fed/robust.py, README "Hostile clients"): each client's
    # scalars are bounded by clip_factor x the lower median over the round's accepted replies, of the
    # clients' scalar norms ("norm") or of every |scalar| ("scalar"); "none" keeps only the absolute cap.
    clip: str = "norm"
    clip_factor: float = 4.0  # [choice] 2 halved honest SST-2 learning (README, "Hostile clients")
    max_abs_scalar: float = 1e6  # a reply with any |scalar| above this is rejected whole


@dataclass
class FedKSeedConfig:
    """FedKSeed's seed pool (Qin et al., ICML 2024; fed/seedpool.py): works with any strategy and mask."""

    pool_size: int = 0  # K candidate seeds shared by server and clients (the paper: 4096); 0 = fresh seeds
    sampling: str = "uniform"  # uniform | pro (FedKSeed-Pro: softmax of the normalised mean |g| per seed)
    pro_clip: float = 1000.0  # pro: |g| is clipped to this before averaging (the paper's code default)


@dataclass
class FedMeZOConfig:
    signal: str = "model_diff"  # model_diff | last_loss | mean_loss_5 (FedMeZO's heterogeneity index)
    lr_scale: float = 5e-6  # lr_i = lr + lr_scale * phi_i, phi_i in [-1, 1]


@dataclass
class VPConfig:
    """Meerkat-vp (method doc section 4): GradIP calibration, detection thresholds, re-checks."""

    calibration_steps: int = 100
    early_window: tuple[int, int] = (0, 20)
    late_window: tuple[int, int] = (50, 100)
    quiet_factor: float = 0.1
    rho_later: float = 5.0
    rho_quiet: float = 0.5
    recheck_every: int = 20
    control: str = "detect"  # detect | random (random early stopping, same count)
    log_gradip: bool = True  # write gradip.jsonl (any strategy) when the mask stores the pre-training gradient
    gradip_cosine: bool = False  # also log cos(grad f_p, g*z) per step (analysis only)


@dataclass
class RunConfig:
    seed: int = 0
    out: str | None = None  # run folder; None = runs/<method>-<task>-<timestamp>
    eval_every: int = 5  # rounds; 0 = only at the end
    checkpoint_every: int = 5  # rounds
    zero_shot: bool = True  # evaluate before training
    tensorboard: bool = False  # mirror metrics.jsonl into <run folder>/tensorboard/ (the `tensorboard` extra)


@dataclass
class Config:
    # The method (meerkat_fl.methods: `meerkat methods` lists them); None: inferred from fed.strategy, mask.kind
    # and fedkseed.* (configs written before methods were objects). Resolved by ``validate``.
    method: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    fo: FOConfig = field(default_factory=FOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    fedmezo: FedMeZOConfig = field(default_factory=FedMeZOConfig)
    fedkseed: FedKSeedConfig = field(default_factory=FedKSeedConfig)
    vp: VPConfig = field(default_factory=VPConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {hint}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            return tuple(_coerce(key, v, args[0]) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _section_hints(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


TOP_LEVEL = ("method",)  # settings that are not in a section


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name not in TOP_LEVEL]


def _set_top(cfg: Config, key: str, value: Any) -> None:
    setattr(cfg, key, _coerce(key, value, typing.get_type_hints(Config)[key]))


def from_dict(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """A Config from nested mappings (TOML tables); unknown sections or keys raise ConfigError."""
    cfg = copy_config(base) if base is not None else Config()
    for section_name, values in data.items():
        if section_name in TOP_LEVEL:
            _set_top(cfg, section_name, values)
            continue
        if section_name not in _sections():
            known = ", ".join(f.name for f in dataclasses.fields(Config))
            raise ConfigError(f"unknown config section {section_name!r} (known: {known})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section_name}: expected a table of settings, got {values!r}")
        section = getattr(cfg, section_name)
        hints = _section_hints(section)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section_name}.{key} (known: {', '.join(hints)})")
            setattr(section, key, _coerce(f"{section_name}.{key}", value, hints[key]))
    return cfg


def copy_config(cfg: Config) -> Config:
    """A deep copy (sections are mutable dataclasses)."""
    return from_plain(to_dict(cfg))


def from_plain(data: Mapping[str, Any]) -> Config:
    cfg = Config()
    for key in TOP_LEVEL:
        _set_top(cfg, key, data.get(key))
    for name in _sections():
        section = getattr(cfg, name)
        hints = _section_hints(section)
        for key, value in data.get(name, {}).items():
            setattr(section, key, _coerce(f"{name}.{key}", value, hints[key]))
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"fed.rounds=10"`` → ("fed.rounds", 10); values use TOML syntax, bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = (part.strip() for part in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def is_config_key(key: str) -> bool:
    """Whether ``key`` names a setting (``section.key`` or a top-level key): how Flower's run-config and
    node-config keys are told apart from their own ones."""
    if key in TOP_LEVEL:
        return True
    section, _, name = key.partition(".")
    return section in _sections() and name in _section_hints(getattr(Config(), section))


def parse_override_list(text: str) -> list[str]:
    """Whitespace-separated ``key=value`` items with shell quoting, so a TOML list survives:
    ``fed.rounds=5 'lora.targets=["q_proj", "v_proj"]'``."""
    import shlex

    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"overrides {text!r}: {exc}") from None


def apply_overrides(cfg: Config, overrides: Iterable[str] | Mapping[str, Any]) -> Config:
    """Apply dotted ``section.key=value`` overrides (strings, or a mapping of dotted keys to values)."""
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in items:
        if key in TOP_LEVEL:
            nested[key] = value  # type: ignore[assignment]
            continue
        if key.count(".") != 1:
            raise ConfigError(f"override key {key!r} must be section.key, e.g. fed.rounds")
        section, name = key.split(".")
        if isinstance(value, str) and section in {f.name for f in dataclasses.fields(Config)}:
            hint = _section_hints(getattr(cfg, section)).get(name)
            value = _from_string(value, hint)
        nested.setdefault(section, {})[name] = value
    return from_dict(nested, cfg)


def _from_string(value: str, hint: Any) -> Any:
    """Strings from Flower's run-config or --set are re-read as numbers/bools when the field wants one."""
    wants_str = hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))
    if wants_str or hint is None:
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def validate(cfg: Config) -> Config:
    """Resolve the method (in place), check choices and ranges; returns ``cfg`` or raises ConfigError naming the
    key (``config_checks.py`` holds the rules)."""
    from meerkat_fl.config_checks import validate as check

    return check(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """{"section.key": value} for every setting (top-level settings under their own name)."""
    flat: dict[str, Any] = {}
    for s, section in to_dict(cfg).items():
        if s in TOP_LEVEL:
            flat[s] = section
        else:
            flat.update({f"{s}.{k}": v for k, v in section.items()})
    return flat


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """TOML text of the resolved config. TOML has no null: None is written as the string "none", which
    loading reads back as None for the optional keys, so a saved config reloads to the same Config."""
    data: dict[str, Any] = {k: v for k, v in to_dict(cfg).items() if k in TOP_LEVEL and v is not None}
    data.update({
        s: {k: "none" if v is None else list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        for s, section in to_dict(cfg).items() if s not in TOP_LEVEL
    })
    return tomli_w.dumps(data)


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a TOML file (or the defaults), apply overrides, validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder, not a TOML file") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        cfg = from_dict(data)
    return validate(apply_overrides(cfg, list(overrides)))


def resolve_environment(cfg: Config, environ: Mapping[str, str] | None = None) -> Config:
    """Fill settings whose default comes from the environment (the only place env is read).

    task.data_dir ← $MEERKAT_DATA_DIR; mask.calibration ← <data_dir>/calibration/wikitext-2, else the
    WikiText-2 excerpt shipped in meerkat_fl/data.
    """
    environ = os.environ if environ is None else environ
    cfg = copy_config(cfg)
    if cfg.task.data_dir is None and environ.get("MEERKAT_DATA_DIR"):
        cfg.task.data_dir = environ["MEERKAT_DATA_DIR"]
    if cfg.mask.calibration is None and cfg.task.data_dir is not None:
        candidate = Path(cfg.task.data_dir) / "calibration" / "wikitext-2"
        if candidate.exists():
            cfg.mask.calibration = str(candidate)
    if cfg.mask.calibration is None:  # the WikiText-2 excerpt shipped with the package (meerkat_fl/data)
        from meerkat_fl.data import BUNDLED_CALIBRATION

        cfg.mask.calibration = str(BUNDLED_CALIBRATION)
    return cfg


def method_name(cfg: Config) -> str:
    """The name of the method a config describes: ``cfg.method``, or the one its flags make (methods.infer)."""
    from meerkat_fl import methods

    return cfg.method if cfg.method is not None else methods.infer(flatten(cfg))
