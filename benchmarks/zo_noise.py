"""Noise measurements for ``zo_step.py``: generator throughput, MeZO's reference step, server replay.

Imported by ``zo_step.py`` (same process, same model and batch); not a script of its own.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource
from meerkat_fl.zo import replay

SOURCES = {
    "torch_cpu/gaussian": NoiseSource("torch_cpu", "gaussian"),
    "torch_cpu/rademacher": NoiseSource("torch_cpu", "rademacher"),
    "philox/gaussian": NoiseSource("philox", "gaussian"),
    "philox/rademacher": NoiseSource("philox", "rademacher"),
}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def noise_throughput(size: int = 1 << 22, threads: tuple[int, ...] = (1, 2), reps: int = 3) -> dict[str, dict]:
    """Values per second of ``segment`` (one tensor of ``size`` values) per source and torch thread count."""
    before = torch.get_num_threads()
    out: dict[str, dict] = {}
    try:
        for name, source in SOURCES.items():
            out[name] = {}
            for count in threads:
                torch.set_num_threads(count)
                source.segment(1, 0, 1 << 16)  # warm-up
                best = statistics.median(_seconds(lambda s=source: s.segment(7, 0, size)) for _ in range(reps))
                out[name][str(count)] = size / best
    finally:
        torch.set_num_threads(before)
    return out


class MeZOReference:
    """MeZO's reference dense step (princeton-nlp/MeZO, ``trainer.py``), reproduced faithfully on our model:
    ``zo_perturb_parameters`` re-seeds the global RNG and draws ``torch.normal`` per parameter in place
    (``param.data = param.data + scale * z * eps``) for +eps, -2eps and +eps (restore by arithmetic), then
    ``zo_update`` re-seeds and draws again for ``param.data -= lr * projected_grad * z``: four draws."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[], float], eps: float, lr: float) -> None:
        # MeZO's full-parameter runs perturb every parameter (ours are frozen for autograd: requires_grad=False)
        self.params = list(model.parameters())
        self.loss_fn, self.eps, self.lr, self.seed = loss_fn, eps, lr, 0

    @torch.no_grad()
    def _perturb(self, scale: float) -> None:
        torch.manual_seed(self.seed)  # MeZO's global RNG: benchmark only, never library code
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scale * z * self.eps

    @torch.no_grad()
    def step(self) -> None:
        self.seed += 1
        self._perturb(1.0)
        loss_plus = self.loss_fn()
        self._perturb(-2.0)
        loss_minus = self.loss_fn()
        self._perturb(1.0)
        projected_grad = (loss_plus - loss_minus) / (2 * self.eps)
        torch.manual_seed(self.seed)
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data - self.lr * projected_grad * z


def replay_seconds(values: torch.Tensor, mask: Mask, source: NoiseSource, steps: int, lr: float) -> float:
    """Seconds the server takes to replay a ``steps``-step (seed, scalar) path over ``mask``."""
    path = [(1000 + i, 0.5 - i / steps) for i in range(steps)]
    return _seconds(lambda: replay(values, mask, path, lr, noise=source))
