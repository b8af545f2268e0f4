"""Server strategies (STYLE principle 2): one small module per method family, a protocol and a registry."""

from meerkat_fl.fed.strategies.base import ClientInstructions, RoundOutcome, Strategy, UniformStrategy
from meerkat_fl.fed.strategies.fedmezo import (
    FedMeZOStrategy,
    heterogeneity_index,
    model_diff_signals,
    personalised_lrs,
)
from meerkat_fl.fed.strategies.meerkat_vp import MeerkatVPStrategy
from meerkat_fl.fed.strategies.registry import STRATEGIES, make_strategy, strategy_names

__all__ = [
    "STRATEGIES",
    "ClientInstructions",
    "FedMeZOStrategy",
    "MeerkatVPStrategy",
    "RoundOutcome",
    "Strategy",
    "UniformStrategy",
    "heterogeneity_index",
    "make_strategy",
    "model_diff_signals",
    "personalised_lrs",
    "strategy_names",
]
