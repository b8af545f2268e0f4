"""The strategy protocol: the two verbs of a round (STYLE principle 2, as Flower's configure/aggregate).

``configure`` decides what each sampled client is told (its lr and number of local steps; the server adds the
round's seeds); ``aggregate`` turns the round's accepted virtual paths into the new global values. A strategy
carries no state from one call into the next other than what it documents as its state, and that state
round-trips through ``state_dict`` (tensors and JSON) so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from meerkat_fl.fed.messages import ClientPath, ClientUpdate
from meerkat_fl.masks import Mask

# (start values, accepted paths) -> new global values: the weighted mean of the replayed virtual paths, or the
# seed pool's exact coefficient sums (FedKSeed). The server hands its combine rule to the strategy.
Combine = Callable[[torch.Tensor, Sequence[ClientPath]], torch.Tensor]


@dataclass(frozen=True)
class ClientInstructions:
    """What one sampled client is told for a round (besides the seeds, which the server draws)."""

    lr: float
    local_steps: int
    estimator: str = "zo"  # how the client trains: "zo" (seeded two-point steps) or "fo" (backprop; messages.UPLINKS)
    optimizer: str = "sgd"  # first order only: the local optimiser (local.FO_OPTIMIZERS)


@dataclass
class RoundOutcome:
    """What ``aggregate`` returns: the new global values and extra metrics for the round's log line."""

    values: torch.Tensor
    metrics: dict[str, Any]


class Strategy(Protocol):
    name: str

    def configure(
        self, round_index: int, client_ids: Sequence[int], base: ClientInstructions
    ) -> dict[int, ClientInstructions]: ...

    def aggregate(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: Mapping[int, ClientUpdate], combine: Combine,
    ) -> RoundOutcome: ...

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None: ...


class UniformStrategy:
    """Every client gets the same lr and T; the new global values are ``combine`` of the paths (weighted replay).

    Meerkat, Full-FedZO, the mask baselines, LoRA-FedZO and FedKSeed are this strategy: they differ in the
    trainable coordinates (mask), the seed source (pool) and the downlink, not in the server's rule.
    """

    name = "meerkat"

    def configure(
        self, round_index: int, client_ids: Sequence[int], base: ClientInstructions
    ) -> dict[int, ClientInstructions]:
        return {cid: base for cid in client_ids}

    def aggregate(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: Mapping[int, ClientUpdate], combine: Combine,
    ) -> RoundOutcome:
        return RoundOutcome(combine(start, paths), {})

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        pass
