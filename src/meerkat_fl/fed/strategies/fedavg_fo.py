"""FedAvg with backpropagation on the same trainable coordinates: the paper's first-order upper bound.

Clients run T first-order steps (SGD or Adam, ``local.local_train_fo``) on the masked coordinates (or every
weight with a dense mask, or LoRA adapters) and upload the masked delta; the server's new values are the
weighted mean of the clients' endpoints, start + delta. Its uplink is values, not scalars: O(mask size) bytes a
client instead of O(T), and it needs backprop's memory. Only the "values" downlink fits: a first-order path
cannot be replayed from seeds and scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from meerkat_fl.fed.messages import ClientPath, ClientUpdate
from meerkat_fl.fed.strategies.base import ClientInstructions, Combine, RoundOutcome
from meerkat_fl.masks import Mask


def average_endpoints(start: torch.Tensor, weights: Mapping[int, float], deltas: Mapping[int, np.ndarray]) -> torch.Tensor:
    """w^r = sum_k p_k * (w^{r-1} + delta_k), in client-id order (weights already normalised).

    The same sum of endpoints as the ZO replay (``aggregate_paths``); with no client the model is unchanged.
    """
    if not weights:
        return start.clone()
    total = torch.zeros_like(start)
    for cid in sorted(weights):
        endpoint = start + torch.from_numpy(np.array(deltas[cid], dtype=np.float32)).to(start.device)
        total.add_(endpoint, alpha=weights[cid])
    return total


class FedAvgFOStrategy:
    """Every client gets the same first-order instructions; the server averages the uploaded endpoints.

    ``lr`` and ``optimizer`` (``fo.lr``, ``fo.optimizer``) are settings, not state: the run's zeroth-order base
    lr does not apply to backprop steps. No state is kept between rounds (local Adam restarts every round).
    """

    name = "fedavg_fo"

    def __init__(self, lr: float, optimizer: str = "sgd"):
        self.lr, self.optimizer = lr, optimizer

    def configure(
        self, round_index: int, client_ids: Sequence[int], base: ClientInstructions
    ) -> dict[int, ClientInstructions]:
        told = ClientInstructions(self.lr, base.local_steps, estimator="fo", optimizer=self.optimizer)
        return {cid: told for cid in client_ids}

    def aggregate(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: Mapping[int, ClientUpdate], combine: Combine,
    ) -> RoundOutcome:
        weights = {p.client_id: p.weight for p in paths}  # the accepted clients, weights normalised
        deltas = {cid: updates[cid].values for cid in weights}
        norms = {str(cid): float(np.linalg.norm(d)) for cid, d in sorted(deltas.items())}
        return RoundOutcome(average_endpoints(start, weights, deltas), {"fo_delta_norm": norms})

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        pass
