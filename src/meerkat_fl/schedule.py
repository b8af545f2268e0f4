"""The learning-rate schedule: a pure function of (unit index, number of units) that scales a method's lr.

The unit is the round in a federated run (every local step of a round has the round's lr, which the plan
carries and the client path records, so the server's replay, the "scalars" downlink's client replay and
FedKSeed's pool all apply the lr the client used, and a resume recomputes it from the round number) and the
step in ``meerkat finetune``. It scales whatever lr the method chose: ``zo.lr``, ``fo.lr`` or FedMeZO's
personalised lr.

    constant   1
    linear     final + (1 - final) * (1 - p)
    cosine     final + (1 - final) * (1 + cos(pi * p)) / 2

with p = (i - warmup) / (n - warmup) in [0, 1) the progress past the warm-up, so the first unit after it has
the full lr and the lr approaches ``final`` x lr at the end (transformers' convention); during the warm-up
(units 0 .. warmup-1) the factor rises linearly, (i + 1) / (warmup + 1), never 0, so no step is wasted.
Written here rather than taken from transformers' schedulers because those are bound to a torch optimiser
(``LambdaLR``) and the lr here is a number both parties compute, not an optimiser's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    kind: str = "constant"
    final: float = 0.0  # the lr approached at the end, as a fraction of the configured lr
    warmup: int = 0  # units of linear warm-up before the decay

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr schedule: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.final <= 1.0:
            raise ValueError(f"lr schedule: final must be in [0, 1], got {self.final!r}")
        if self.warmup < 0:
            raise ValueError(f"lr schedule: warmup must be >= 0, got {self.warmup!r}")

    @property
    def constant(self) -> bool:
        return self.kind == "constant" and self.warmup == 0

    def factor(self, index: int, total: int) -> float:
        """The multiplier of unit ``index`` (0-based) of ``total``; 1.0 for every unit of a constant schedule."""
        if index < self.warmup:
            return (index + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (index - self.warmup) / max(1, total - self.warmup)
        progress = min(progress, 1.0)  # a unit past the planned end keeps the final lr
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final + (1.0 - self.final) * shape

    def lr(self, base: float, index: int, total: int) -> float:
        """``base`` scaled for unit ``index`` of ``total``; exactly ``base`` when the factor is 1."""
        factor = self.factor(index, total)
        return base if factor == 1.0 else base * factor


CONSTANT = LRSchedule()
