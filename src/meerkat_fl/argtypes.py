"""argparse pieces for the `meerkat` command: one-line errors, and flags that are bounded numbers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is a --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float, high: float | Callable[[], float]) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` number in [low, high] (NaN and inf are outside every range); ``high`` may be
    a function, called only when the flag is given (the limits live in modules that import torch)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        top = high() if callable(high) else high
        if not low <= value <= top:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {top}], got {text}")
        return value

    return parse


def max_clients() -> int:
    from meerkat_fl.config_checks import MAX_CLIENTS

    return MAX_CLIENTS


def max_round() -> int:
    from meerkat_fl.fed.messages import MAX_ROUND

    return MAX_ROUND
