"""FedMeZO: a personalised client-wise lr from a heterogeneity index of the last round (arXiv 2402.05926)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from meerkat_fl.fed.aggregate import client_endpoint
from meerkat_fl.fed.messages import ClientPath, ClientUpdate
from meerkat_fl.fed.strategies.base import ClientInstructions, Combine, RoundOutcome
from meerkat_fl.masks import Mask
from meerkat_fl.noise import LEGACY, NoiseSource

SIGNALS = ("model_diff", "last_loss", "mean_loss_5")


def heterogeneity_index(signals: dict[int, float]) -> dict[int, float]:
    """FedMeZO's Phi_i = (D_i - mean D) / max_j |D_j - mean D|, in [-1, 1]; all zero when D is constant."""
    if not signals:
        return {}
    mean = float(np.mean(list(signals.values())))
    spread = max(abs(d - mean) for d in signals.values())
    if spread == 0.0:
        return {k: 0.0 for k in signals}
    return {k: (d - mean) / spread for k, d in signals.items()}


def personalised_lr(lr: float, lr_scale: float, phi: float) -> float:
    """lr_i = lr + lr_scale * Phi_i, floored at 0 [choice: the paper's code has no floor, a negative lr would
    ascend]."""
    return max(0.0, lr + lr_scale * phi)


def personalised_lrs(lr: float, lr_scale: float, signals: dict[int, float]) -> dict[int, float]:
    """lr_i for every client with a signal, for any number of clients (the public code is hard-wired to 3)."""
    return {k: personalised_lr(lr, lr_scale, phi) for k, phi in heterogeneity_index(signals).items()}


def model_diff_signals(
    start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath], *, noise: NoiseSource
) -> dict[int, float]:
    """D_i = sum over tensors of ||delta_i - mean_j delta_j||_2, delta_i = w_i^T - w^{r-1} (two replays each)."""
    if not paths:
        return {}
    mean_delta = torch.zeros_like(start)
    for path in paths:
        mean_delta.add_(client_endpoint(start, mask, path, noise=noise) - start, alpha=1.0 / len(paths))
    bounds = np.concatenate([[0], np.cumsum(mask.sizes)])
    signals = {}
    for path in paths:
        diff = client_endpoint(start, mask, path, noise=noise) - start - mean_delta
        signals[path.client_id] = float(sum(diff[a:b].norm() for a, b in itertools.pairwise(bounds)))
    return signals


class FedMeZOStrategy:
    """Personalised client-wise lr; the signal is model_diff, last_loss or mean_loss_5.

    State: each client's last heterogeneity index Phi (clients not sampled keep theirs) and its loss
    history. A client's lr is derived from Phi and the round's base lr when it is configured, so nothing
    said in one call is remembered for the next. A client whose signal is not finite (a NaN loss that got
    through) gets Phi = 0, the base lr, and does not disturb the others' index.
    """

    name = "fedmezo"

    def __init__(self, signal: str = "model_diff", lr_scale: float = 5e-6, lr: float | None = None, *,
                 noise: NoiseSource = LEGACY):
        """``lr``, the run's base lr, is only used to report the next round's lrs (``configure`` gets it)."""
        if signal not in SIGNALS:
            raise ValueError(f"fedmezo signal must be one of {SIGNALS}, got {signal!r}")
        self.signal, self.lr_scale, self.lr = signal, lr_scale, lr
        self.noise = noise  # the run's: model_diff replays every client's path
        self.phi: dict[int, float] = {}
        self.loss_history: dict[int, list[float]] = {}

    def configure(
        self, round_index: int, client_ids: Sequence[int], base: ClientInstructions
    ) -> dict[int, ClientInstructions]:
        return {cid: ClientInstructions(personalised_lr(base.lr, self.lr_scale, self.phi[cid]), base.local_steps)
                if cid in self.phi else base for cid in client_ids}

    def _signals(self, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
                 updates: Mapping[int, ClientUpdate]) -> dict[int, float]:
        if self.signal == "model_diff":
            return model_diff_signals(start, mask, paths, noise=self.noise)
        if self.signal == "last_loss":
            return {cid: self.loss_history[cid][-1] for cid in updates}
        return {cid: float(np.mean(self.loss_history[cid][-5:])) for cid in updates}

    def aggregate(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: Mapping[int, ClientUpdate], combine: Combine,
    ) -> RoundOutcome:
        reported = {}  # clients with a loss this round: one whose steps were all skipped sends none (not 0)
        for cid, update in updates.items():
            losses = update.losses[np.isfinite(update.losses)]
            if losses.size:
                self.loss_history.setdefault(cid, []).append(float(np.mean(losses)))
                reported[cid] = update
        signals = self._signals(start, mask, paths, reported)
        finite = {cid: d for cid, d in signals.items() if math.isfinite(d)}
        self.phi.update({cid: 0.0 for cid in signals if cid not in finite})
        self.phi.update(heterogeneity_index(finite))
        values = combine(start, paths)
        metrics: dict[str, Any] = {"fedmezo_phi": {str(k): v for k, v in sorted(self.phi.items())}}
        if self.lr is not None:
            metrics["fedmezo_lr"] = {str(k): personalised_lr(self.lr, self.lr_scale, v) for k, v in sorted(self.phi.items())}
        return RoundOutcome(values, metrics)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"phi": {str(k): v for k, v in self.phi.items()},
                    "loss_history": {str(k): v for k, v in self.loss_history.items()}}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        self.phi = {int(k): float(v) for k, v in state["phi"].items()}
        self.loss_history = {int(k): [float(x) for x in v] for k, v in state["loss_history"].items()}
