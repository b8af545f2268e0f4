"""Server strategies: they differ only where the method differs (STYLE principle 2).

Meerkat (and Full-FedZO, which is Meerkat with a dense mask): the same lr and T for every client.
FedMeZO: a personalised client-wise lr from a heterogeneity index of the last round (arXiv 2402.05926).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from meerkat_fl.fed.aggregate import client_endpoint
from meerkat_fl.fed.messages import ClientPath, ClientUpdate
from meerkat_fl.masks import Mask


class MeerkatStrategy:
    """Same lr and local steps for every client; aggregation is the weighted mean of virtual paths."""

    name = "meerkat"

    def local_steps(self, client_id: int, default: int) -> int:
        return default

    def client_lr(self, client_id: int, lr: float) -> float:
        return lr

    def after_round(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: dict[int, ClientUpdate],
    ) -> dict[str, Any]:
        """Observe a finished round; returns extra metrics for the round's log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def heterogeneity_index(signals: dict[int, float]) -> dict[int, float]:
    """FedMeZO's Phi_i = (D_i - mean D) / max_j |D_j - mean D|, in [-1, 1]; all zero when D is constant."""
    if not signals:
        return {}
    mean = float(np.mean(list(signals.values())))
    spread = max(abs(d - mean) for d in signals.values())
    if spread == 0.0:
        return {k: 0.0 for k in signals}
    return {k: (d - mean) / spread for k, d in signals.items()}


def personalised_lrs(lr: float, lr_scale: float, signals: dict[int, float]) -> dict[int, float]:
    """lr_i = lr + lr_scale * Phi_i, floored at 0 [choice: the paper's code has no floor, a negative lr
    would ascend], for any number of clients (the public code is hard-wired to 3)."""
    return {k: max(0.0, lr + lr_scale * phi) for k, phi in heterogeneity_index(signals).items()}


def model_diff_signals(start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath]) -> dict[int, float]:
    """D_i = sum over tensors of ||delta_i - mean_j delta_j||_2, delta_i = w_i^T - w^{r-1} (two replays each)."""
    if not paths:
        return {}
    mean_delta = torch.zeros_like(start)
    for path in paths:
        mean_delta.add_(client_endpoint(start, mask, path) - start, alpha=1.0 / len(paths))
    bounds = np.concatenate([[0], np.cumsum(mask.sizes)])
    signals = {}
    for path in paths:
        diff = client_endpoint(start, mask, path) - start - mean_delta
        signals[path.client_id] = float(sum(diff[a:b].norm() for a, b in itertools.pairwise(bounds)))
    return signals


class FedMeZOStrategy(MeerkatStrategy):
    """Personalised client-wise lr; the signal is model_diff, last_loss or mean_loss_5."""

    name = "fedmezo"

    def __init__(self, signal: str = "model_diff", lr_scale: float = 5e-6):
        self.signal, self.lr_scale = signal, lr_scale
        self.lrs: dict[int, float] = {}  # personalised lr offsets decided at the last round
        self.base_lr: float | None = None
        self.loss_history: dict[int, list[float]] = {}

    def client_lr(self, client_id: int, lr: float) -> float:
        self.base_lr = lr
        return self.lrs.get(client_id, lr)

    def after_round(self, round_index, start, mask, paths, updates):
        for cid, update in updates.items():
            self.loss_history.setdefault(cid, []).append(float(np.mean(update.losses)) if update.losses.size else 0.0)
        if self.signal == "model_diff":
            signals = model_diff_signals(start, mask, paths)
        elif self.signal == "last_loss":
            signals = {cid: self.loss_history[cid][-1] for cid in updates}
        else:
            signals = {cid: float(np.mean(self.loss_history[cid][-5:])) for cid in updates}
        base = self.base_lr if self.base_lr is not None else 0.0
        self.lrs.update(personalised_lrs(base, self.lr_scale, signals))
        return {"fedmezo_lr": {str(k): v for k, v in sorted(self.lrs.items())}}

    def state_dict(self):
        return {"lrs": {str(k): v for k, v in self.lrs.items()}, "base_lr": self.base_lr,
                "loss_history": {str(k): v for k, v in self.loss_history.items()}}

    def load_state_dict(self, state):
        self.lrs = {int(k): float(v) for k, v in state["lrs"].items()}
        self.base_lr = state["base_lr"]
        self.loss_history = {int(k): list(v) for k, v in state["loss_history"].items()}
