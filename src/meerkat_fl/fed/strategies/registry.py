"""Strategy registry: a name -> a builder from the resolved config (the edge; strategies take plain arguments).

Adding a server rule is one module under ``fed/strategies/`` plus one entry here (and, for a new method, one
entry in ``meerkat_fl.methods``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.strategies.base import Strategy, UniformStrategy
from meerkat_fl.fed.strategies.fedavg_fo import FedAvgFOStrategy
from meerkat_fl.fed.strategies.fedmezo import FedMeZOStrategy
from meerkat_fl.fed.strategies.meerkat_vp import MeerkatVPStrategy
from meerkat_fl.noise import noise_source
from meerkat_fl.vp import DetectionSettings


def _fedmezo(cfg: Any) -> Strategy:
    return FedMeZOStrategy(cfg.fedmezo.signal, cfg.fedmezo.lr_scale, cfg.zo.lr,
                           noise=noise_source(cfg.zo.noise_generator, cfg.zo.noise))


def _meerkat_vp(cfg: Any) -> Strategy:
    vp = cfg.vp
    return MeerkatVPStrategy(range(cfg.fed.num_clients), DetectionSettings.from_vp(vp),
                             recheck_every=vp.recheck_every, control=vp.control, seed=cfg.run.seed,
                             noise=noise_source(cfg.zo.noise_generator, cfg.zo.noise))


STRATEGIES: dict[str, Callable[[Any], Strategy]] = {
    "meerkat": lambda cfg: UniformStrategy(),
    "fedmezo": _fedmezo,
    "meerkat_vp": _meerkat_vp,
    "fedavg_fo": lambda cfg: FedAvgFOStrategy(cfg.fo.lr, cfg.fo.optimizer),
}


def strategy_names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def make_strategy(cfg: Any) -> Strategy:
    """The server strategy ``cfg.fed.strategy`` names, built from the resolved config."""
    try:
        builder = STRATEGIES[cfg.fed.strategy]
    except KeyError:
        raise ConfigError(f"fed.strategy: unknown strategy {cfg.fed.strategy!r} "
                          f"(known: {', '.join(STRATEGIES)})") from None
    return builder(cfg)
