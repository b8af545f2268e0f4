"""The local training loops: T zeroth-order steps (or, for the first-order upper bound, T backprop steps) over
a walk through one party's data.

Used by `meerkat finetune` (one party, many steps) and by every federated client (T steps a round).
"""

from __future__ import annotations

import math
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


# First-order local optimisers on the float32 master values [choice: torch's own SGD (no momentum) and Adam
# (default betas, eps 1e-8); a fresh optimiser each round, so Adam's moments are local to a round, as in FedAvg
# with local Adam, and a round needs no optimiser state from the last one].
FO_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def masked_gradient(params: MaskedParams, loss_fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(loss, d loss / d masked values as float32 in mask order) by backprop at the model's current weights.

    Only the mask's tensors require grad for the call; each one's gradient is gathered at its masked entries
    as soon as it is accumulated and then dropped, so at most one full-tensor gradient is alive at a time
    (a sparse mask's cost is its activations, not a model-sized gradient).
    """
    grad = torch.zeros(params.size, dtype=torch.float32, device=params.device)

    def gather_into(sl: slice, idx: torch.Tensor | None) -> Callable[[torch.Tensor], None]:
        def hook(tensor: torch.Tensor) -> None:
            flat = tensor.grad.reshape(-1)
            grad[sl] = (flat if idx is None else flat[idx]).float()
            tensor.grad = None
        return hook

    handles = []
    try:
        for _, sl, tensor, idx in params.segments():
            tensor.requires_grad_(True)
            handles.append(tensor.register_post_accumulate_grad_hook(gather_into(sl, idx)))
        with torch.enable_grad():
            loss = loss_fn()
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for tensor in params.tensors:
            tensor.requires_grad_(False)  # models are loaded frozen; only this call differentiates
            tensor.grad = None
    return value, grad


@dataclass(frozen=True)
class FirstOrderStep:
    loss: float  # the batch loss at the step's starting point
    skipped: bool = False  # the loss or a gradient entry was NaN/inf: no update


def local_train_fo(
    params: MaskedParams,
    values: torch.Tensor,
    steps: int,
    *,
    lr: float,
    optimizer: str,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    pointer: DataPointer,
    batch_size: int,
) -> list[FirstOrderStep]:
    """Run ``steps`` first-order steps from ``values`` (updated in place); the model ends holding ``values``.

    Each step: backprop on the next batch, the gradient's masked entries, one optimiser step on the float32
    master values, written back into the model's masked coordinates only. A non-finite step is skipped.
    """
    master = values.detach()
    opt = FO_OPTIMIZERS[optimizer]([master], lr=lr)
    done = []
    params.write(master)
    for _ in range(steps):
        batch = pointer.next_batch(batch_size)
        loss, grad = masked_gradient(params, lambda rows=batch: batch_loss(rows))
        if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
            done.append(FirstOrderStep(float("nan"), skipped=True))
            continue
        master.grad = grad
        opt.step()
        master.grad = None
        params.write(master)
        done.append(FirstOrderStep(loss))
    return done
