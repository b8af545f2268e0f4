"""Config is data: one typed dataclass tree (config_schema.py), loaded from TOML, overridden by dotted
``key=value`` strings.

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
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

# The dataclass tree (config_schema.py), importable from here as before the split.
from meerkat_fl.config_schema import (  # noqa: F401
    TASK_OPTIONS,
    Config,
    FedConfig,
    FedKSeedConfig,
    FedMeZOConfig,
    FOConfig,
    LoraConfig,
    LRScheduleConfig,
    MaskConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    VPConfig,
    ZOConfig,
)
from meerkat_fl.errors import ConfigError


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
