"""The method registry: a method is one named object, not a combination of flags.

A ``Method`` fixes the settings that make it what it is (its server strategy, its trainable coordinates, its
seed source) and starts from defaults a user may change (FedMeZO on LoRA adapters is its own paper's setting;
FedKSeed's pool size). ``resolve`` applies a method to a config: a fixed key the user set to something else is
a ConfigError naming both; a key left at its global default takes the method's value. A config without
``method`` keeps working: the method is inferred from the old flags (``infer``), or the error names the method
to use.

Presets (``lr``, ``eps``) are the embedded SmolLM2-135M's tuned values from the paper grid
(BENCHMARKS.md) at the method's reference density; ``preset_lr`` scales the lr with density, since the
stable ZO lr shrinks with the number of perturbed weights (the paper grid: ``lr * 1e-3 / density``).
``meerkat tune`` centres its grid there.

Adding a method: one entry in ``METHODS`` (plus a strategy module under ``fed/strategies/`` if its server
rule is new) and one row in the method matrix test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meerkat_fl.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for `meerkat methods`
    fixed: Mapping[str, Any]  # dotted key -> value the method is made of
    defaults: Mapping[str, Any] = field(default_factory=dict)  # dotted key -> value a user may override
    downlinks: tuple[str, ...] = ("values", "scalars")  # supported; the first is the default
    lr: float = 5e-4  # preset for the embedded model at ``density``
    eps: float = 1e-3
    density: float = 1e-3  # the density the lr preset was tuned at (1.0: dense)
    tuned: bool = True  # False: the lr preset is a starting guess, not a tuned value (run `meerkat tune`)
    downlinks_why: str = ""  # why a downlink is unsupported, for the config error
    lr_key: str = "zo.lr"  # the setting ``lr`` presets (and `meerkat tune` sweeps)


_ZO = {"fedkseed.pool_size": 0, "fedkseed.sampling": "uniform"}
_POOL_DOWNLINKS = ("pool", "scalars", "values")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("meerkat", "sparse ZO on a static sensitive mask (WikiText gradients), weighted replay of virtual paths",
           {"fed.strategy": "meerkat", "mask.kind": "sensitive", **_ZO}),
    Method("meerkat_vp", "Meerkat + GradIP early stopping of extreme Non-IID clients (Meerkat-vp)",
           {"fed.strategy": "meerkat_vp", "vp.control": "detect", "mask.kind": "sensitive", **_ZO}),
    Method("random_stop", "Meerkat-vp's control: as many clients early-stopped as detection would, at random",
           {"fed.strategy": "meerkat_vp", "vp.control": "random", "mask.kind": "sensitive", **_ZO}),
    Method("full_fedzo", "dense federated ZO over every weight (the Full-FedZO baseline)",
           {"fed.strategy": "meerkat", "mask.kind": "dense", **_ZO}, lr=2e-6, density=1.0),
    Method("random_mask", "sparse ZO on a random mask of the same density",
           {"fed.strategy": "meerkat", "mask.kind": "random", **_ZO}, lr=0.512),
    Method("magnitude_mask", "sparse ZO on the largest-magnitude weights at the same density",
           {"fed.strategy": "meerkat", "mask.kind": "magnitude", **_ZO}, lr=3.2e-2),
    Method("lora_fedzo", "ZO on LoRA adapters (rank 8 on q/v by default), base weights frozen",
           {"fed.strategy": "meerkat", "mask.kind": "lora", **_ZO}, lr=1e-4, density=1.0, tuned=False),
    Method("fedmezo", "FedMeZO: personalised client-wise lr from a heterogeneity index (dense; LoRA is its own setting)",
           {"fed.strategy": "fedmezo", **_ZO}, {"mask.kind": "dense"}, lr=2e-6, density=1.0),
    Method("fedkseed", "FedKSeed: step seeds from a pool of K, the model as K coefficients, <= K floats down",
           {"fed.strategy": "meerkat", "fedkseed.sampling": "uniform"},
           {"mask.kind": "dense", "fedkseed.pool_size": 4096}, downlinks=_POOL_DOWNLINKS, lr=2e-6, density=1.0,
           tuned=False),
    Method("fedkseed_pro", "FedKSeed-Pro: FedKSeed with seeds sampled by their mean |projected gradient|",
           {"fed.strategy": "meerkat", "fedkseed.sampling": "pro"},
           {"mask.kind": "dense", "fedkseed.pool_size": 4096}, downlinks=_POOL_DOWNLINKS, lr=2e-6, density=1.0,
           tuned=False),
    Method("fedavg_fo", "first-order upper bound: FedAvg of local backprop steps (fo.optimizer, fo.lr) on the same "
           "mask, masked deltas up", {"fed.strategy": "fedavg_fo", **_ZO}, {"mask.kind": "sensitive"},
           downlinks=("values",), lr=3e-3, density=1.0, tuned=False,  # density 1: a backprop lr is not scaled
           downlinks_why="a first-order path cannot be replayed from seeds and scalars", lr_key="fo.lr"),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method: unknown method {name!r} (known: {', '.join(METHODS)}; see `meerkat methods`)") from None


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def scale_lr(lr: float, reference_density: float, density: float) -> float:
    """An lr tuned at ``reference_density`` moved to ``density``: lr * reference_density / density (the paper
    grid's centre rule too)."""
    return lr * reference_density / density


def preset_lr(method: Method, density: float) -> float:
    """The method's lr preset moved to ``density`` (``scale_lr``; dense methods: unchanged)."""
    if method.density >= 1.0 or density <= 0:
        return method.lr
    return scale_lr(method.lr, method.density, density)


def infer(flat: Mapping[str, Any]) -> str:
    """The method an old-style config (no ``method`` key) describes, from its strategy, mask and pool keys."""
    strategy, kind, pool = flat["fed.strategy"], flat["mask.kind"], flat["fedkseed.pool_size"]
    if pool:
        if strategy != "meerkat":
            raise ConfigError(f"fed.strategy={strategy!r} with fedkseed.pool_size={pool} is no registered method: "
                              f"set method = \"fedkseed\" (a seed pool with the plain server rule) or drop the pool")
        return "fedkseed_pro" if flat["fedkseed.sampling"] == "pro" else "fedkseed"
    if strategy in ("fedmezo", "fedavg_fo"):
        return strategy
    if strategy == "meerkat_vp":
        return "meerkat_vp" if flat["vp.control"] == "detect" else "random_stop"
    return {"sensitive": "meerkat", "dense": "full_fedzo", "random": "random_mask",
            "magnitude": "magnitude_mask", "lora": "lora_fedzo"}[kind]


def resolve(flat: Mapping[str, Any], defaults: Mapping[str, Any], name: str | None) -> tuple[str, dict[str, Any]]:
    """(method name, the dotted settings to set) for a flattened config.

    ``defaults`` is the flattened default config: a key still at its default counts as not set by the user.
    An inferred method (``name`` None: an old-style config) changes nothing: its flags keep their meaning.
    """
    if name is None:
        inferred, downlink = get_method(infer(flat)), flat["fed.downlink"]
        # old flags keep their messages (a pool downlink without a pool is config's error); a downlink the
        # method cannot run at all is named here. fed.downlink unset: "values", as before methods were objects
        if downlink is not None and downlink not in inferred.downlinks and inferred.downlinks_why:
            _downlink_error(inferred, downlink)
        return inferred.name, {} if downlink is not None else {"fed.downlink": "values"}
    method = get_method(name)
    updates: dict[str, Any] = {}
    for key, value in method.fixed.items():
        if flat[key] != value and flat[key] != defaults[key]:
            hint = ""
            try:
                other = infer({**flat, **{k: v for k, v in method.fixed.items() if k != key}})
                hint = f"; that is method {other!r}" if other != name else ""
            except (ConfigError, KeyError):
                pass
            raise ConfigError(f"method {name!r} sets {key}={value!r}, but the config has {key}={flat[key]!r}{hint}")
        updates[key] = value
    for key, value in method.defaults.items():
        if flat[key] == defaults[key]:
            updates[key] = value
    downlink = flat["fed.downlink"]
    if downlink is None:
        updates["fed.downlink"] = method.downlinks[0]
    elif downlink not in method.downlinks:
        _downlink_error(method, downlink)
    return name, updates


def _downlink_error(method: Method, downlink: str) -> None:
    why = f" ({method.downlinks_why})" if method.downlinks_why else ""
    raise ConfigError(f"method {method.name!r} supports fed.downlink in {list(method.downlinks)}, "
                      f"got {downlink!r}{why}")


def describe() -> str:
    """The table `meerkat methods` prints."""
    width = max(len(n) for n in METHODS)
    lines = [f"{'method':<{width}}  {'downlinks':<22} {'lr preset':>9}  description"]
    for m in METHODS.values():
        guess = "" if m.tuned else "*"
        lines.append(f"{m.name:<{width}}  {','.join(m.downlinks):<22} {m.lr:>8.3g}{guess:1}  {m.summary}")
    lines.append("lr presets: the embedded SmolLM2-135M's tuned lr (paper grid) at the method's reference density;"
                 " * = an untuned starting guess")
    return "\n".join(lines)
