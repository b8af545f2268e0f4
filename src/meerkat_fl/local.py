"""The local training loop: T zeroth-order steps over a walk through one party's data.

Used by `meerkat finetune` (one party, many steps) and by every federated client (T steps a round).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meerkat_fl.zo import MaskedParams, Step, apply_step, zo_step


def step_seeds(run_seed: int, round_index: int, client_id: int, count: int) -> list[int]:
    """The seeds of ``count`` local steps, a pure function of (run seed, round, client)."""
    rng = np.random.default_rng([run_seed, round_index, client_id, 0x5EED])
    return [int(s) for s in rng.integers(0, 2**62, size=count, dtype=np.int64)]


@dataclass
class DataPointer:
    """Walks ``size`` examples in a seeded shuffled order, epoch after epoch, across rounds.

    Its whole state is (epoch, position): saved in checkpoints and in Flower's per-node context.
    """

    size: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` example indices (wrapping into a freshly shuffled epoch)."""
        if self.size == 0:
            raise ValueError("cannot draw a batch from an empty dataset")
        out: list[np.ndarray] = []
        needed = batch_size
        while needed > 0:
            order = self._order(self.epoch)
            take = order[self.position : self.position + needed]
            out.append(take)
            needed -= len(take)
            self.position += len(take)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(out)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def local_train(
    params: MaskedParams,
    values: torch.Tensor,
    seeds: Sequence[int],
    *,
    lr: float,
    eps: float,
    batch_loss: Callable[[np.ndarray], float],
    pointer: DataPointer,
    batch_size: int,
) -> list[Step]:
    """Run one ZO step per seed from ``values`` (updated in place); the model ends holding ``values``.

    A step whose loss is not finite is skipped (scalar 0, no update) and marked ``skipped``.
    """
    steps = []
    for seed in seeds:
        batch = pointer.next_batch(batch_size)
        step = zo_step(lambda rows=batch: batch_loss(rows), params, values, seed, eps)
        if not step.skipped:
            apply_step(values, params.mask, seed, step.scalar, lr, noise=params.noise, noise_fn=params.segment_noise)
        steps.append(step)
    params.forget_noise()
    params.write(values)
    return steps
