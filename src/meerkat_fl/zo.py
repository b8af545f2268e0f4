"""The zeroth-order core: seeded noise, masked values, the two-point SPSA step, apply and replay.

Everything here is a pure function of (seed, mask, values, scalars) except `MaskedParams.write`, which
writes a flat vector of masked values into a model. The trainable state is always a flat float32 vector
of the masked coordinates (the *master copy*, method doc section 3): the model's own tensors, whatever
their dtype, are only ever written from it, so perturb/restore is a copy and is bit-exact.

Noise is drawn per trainable tensor ("segment") from ``segment_seed(seed, position)`` by the run's
``NoiseSource`` (``noise.py``: the CPU torch generator, or Philox on the values' device), in the mask's
canonical tensor order. A segment is never larger than one tensor's masked values, so dense
(full-parameter) ZO never holds a full-size noise vector: it streams one tensor at a time. The source is
passed explicitly (held by ``MaskedParams``, an argument of ``apply_step`` and ``replay``): no global.

A step draws the same noise three times (+eps, -eps, update); where the source ``fuses`` a tensor (Philox
Rademacher, ``noise_fused.py``) each draw is one compiled pass that adds z without materialising it. ``MaskedParams(cache_noise=True)`` keeps the
current seed's segments instead (one mask-sized float32 buffer): the same values, so bit-identical results,
at a third of the generation cost. ``zo.noise_cache="auto"`` turns it on for sparse masks (a few hundred KB)
and LoRA adapters (a few MB), and off for dense masks of the base weights, where it would add a model-sized
buffer [choice; ``on`` trades that memory for speed].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meerkat_fl.errors import MaskMismatch
from meerkat_fl.masks import Mask
from meerkat_fl.noise import LEGACY, NoiseSource


def segment_noise(seed: int, position: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gaussian noise (float32, ``size`` values) for one tensor from the ``torch_cpu`` generator."""
    return LEGACY.segment(seed, position, size, device)


def noise(seed: int, mask: Mask, device: torch.device | str = "cpu", *, source: NoiseSource = LEGACY) -> torch.Tensor:
    """The full noise vector z for ``seed`` over the mask's coordinates, in canonical order.

    Allocates ``mask.size`` floats: meant for sparse masks and tests. Hot paths stream segments instead.
    """
    return source.draw(seed, mask.sizes, device)


def wants_noise_cache(setting: str, mask: Mask) -> bool:
    """``zo.noise_cache``: on | off | auto (on unless the mask covers whole base tensors, i.e. dense ZO)."""
    if setting == "auto":
        return mask.kind == "lora" or any(idx is not None for idx in mask.indices)
    return setting == "on"


def round_scalar(value: float) -> float:
    """Round a projected gradient to float32, the precision it travels in, so both sides use one value."""
    return float(np.float32(value))


class MaskedParams:
    """Binds a model's tensors to a mask; reads and writes the masked values as one flat float32 vector."""

    def __init__(
        self, model: torch.nn.Module, mask: Mask, *, cache_noise: bool = False, noise: NoiseSource = LEGACY
    ):
        named = dict(model.named_parameters())
        self.mask, self.noise = mask, noise
        self.cache_noise = cache_noise
        self._cached: tuple[int, list[torch.Tensor | None]] | None = None  # (seed, segments drawn so far)
        self.tensors: list[torch.Tensor] = []
        self.indices: list[torch.Tensor | None] = []
        for name, shape, idx in zip(mask.names, mask.shapes, mask.indices):
            if name not in named:
                raise MaskMismatch(f"mask tensor {name!r} does not exist in the model")
            tensor = named[name]
            if tuple(tensor.shape) != tuple(shape):
                raise MaskMismatch(f"mask tensor {name!r} has shape {tuple(shape)}, model has {tuple(tensor.shape)}")
            self.tensors.append(tensor)
            self.indices.append(None if idx is None else idx.to(tensor.device))
        self.offsets = np.concatenate([[0], np.cumsum(mask.sizes)]).astype(np.int64)
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")

    @property
    def size(self) -> int:
        """Number of masked values."""
        return int(self.offsets[-1])

    def segments(self) -> Iterator[tuple[int, slice, torch.Tensor, torch.Tensor | None]]:
        """(position, slice into the flat vector, model tensor, flat indices or None for the whole tensor)."""
        for i, (tensor, idx) in enumerate(zip(self.tensors, self.indices)):
            yield i, slice(int(self.offsets[i]), int(self.offsets[i + 1])), tensor, idx

    def segment_noise(self, seed: int, position: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """This mask's noise for one segment, served from the cache when ``cache_noise`` (never modify it)."""
        if not self.cache_noise:
            return self.noise.segment(seed, position, size, device)
        if self._cached is None or self._cached[0] != seed:
            self._cached = (seed, [None] * len(self.tensors))
            if self.noise.flat_limit:  # philox: the whole mask in one vectorised draw
                self._cached = (seed, list(self.noise.draw(seed, self.mask.sizes, device).split(self.mask.sizes)))
        segments = self._cached[1]
        if segments[position] is None:
            segments[position] = self.noise.segment(seed, position, size, device)
        return segments[position]

    def forget_noise(self) -> None:
        """Drop the cached noise (call when a client's local steps end: frees the buffer)."""
        self._cached = None

    @torch.no_grad()
    def gather(self) -> torch.Tensor:
        """A float32 copy of the model's current masked values (the master copy to train)."""
        out = torch.empty(self.size, dtype=torch.float32, device=self.device)
        for _, sl, tensor, idx in self.segments():
            flat = tensor.detach().reshape(-1)
            out[sl] = (flat if idx is None else flat[idx]).float()
        return out

    @torch.no_grad()
    def write(self, values: torch.Tensor, *, seed: int | None = None, scale: float = 0.0) -> None:
        """Write ``values + scale * z(seed)`` into the model's masked coordinates (``values`` unchanged).

        With ``seed=None`` this writes ``values`` exactly: the restore step and the way a client is switched in.
        """
        perturb = seed is not None and scale != 0.0
        flat = None  # philox on a small mask without the cache: one vectorised draw, not one per tensor
        if perturb and not self.cache_noise and 0 < self.size <= self.noise.flat_limit:
            flat = self.noise.draw(seed, self.mask.sizes, values.device)
        for i, sl, tensor, idx in self.segments():
            segment = values[sl]
            if perturb and flat is None and idx is None and self.noise.fuses(segment.numel()):
                fused_write(tensor, segment, self.noise, seed, i, scale)
                continue
            if perturb:
                z = flat[sl] if flat is not None else self.segment_noise(seed, i, segment.numel(), segment.device)
                # fl(fl(scale * z) + segment), as ``segment + scale * z``, with one temporary, not two
                perturbed = torch.mul(z, scale) if self.cache_noise else z.mul_(scale)
                segment = perturbed.add_(segment)
            segment = segment.to(tensor.dtype)
            if idx is None:
                tensor.copy_(segment.view_as(tensor))
            else:
                tensor.view(-1)[idx] = segment


@dataclass(frozen=True)
class Step:
    """One two-point SPSA step: the seed of its noise and the projected gradient (float32-exact)."""

    seed: int
    scalar: float
    loss: float  # mean of the two perturbed losses: the batch-loss estimate at the current point
    skipped: bool = False  # a perturbed loss was NaN/inf: scalar is 0 and no update is applied


def zo_step(loss_fn: Callable[[], float], params: MaskedParams, values: torch.Tensor, seed: int, eps: float) -> Step:
    """Two-point SPSA on the masked coordinates; the model is left holding exactly ``values``.

    g = [f(w + eps*z) - f(w - eps*z)] / (2*eps), z ~ N(0, I) over the mask from ``seed``.
    """
    params.write(values, seed=seed, scale=eps)
    loss_plus = loss_fn()
    params.write(values, seed=seed, scale=-eps)
    loss_minus = loss_fn()
    params.write(values)  # restore by copy: bit-exact (STYLE 15)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        return Step(seed=seed, scalar=0.0, loss=float("nan"), skipped=True)
    scalar = round_scalar((loss_plus - loss_minus) / (2.0 * eps))
    return Step(seed=seed, scalar=scalar, loss=(loss_plus + loss_minus) / 2.0)


@torch.no_grad()
def apply_step(
    values: torch.Tensor, mask: Mask, seed: int, scalar: float, lr: float, *, noise: NoiseSource,
    noise_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """In place: values -= lr * scalar * z(seed). The client's update and the server's replay are this call.

    ``noise_fn`` draws a segment (``MaskedParams.segment_noise`` serves the step's cached noise); by default
    ``noise`` draws it (a small mask in one call, when the source prefers that).
    """
    if scalar == 0.0 or lr == 0.0:
        return values
    coefficient = -lr * scalar
    if noise_fn is None and 0 < mask.size <= noise.flat_limit:
        noise.add_scaled(values, noise.draw(seed, mask.sizes, values.device), coefficient)
        return values
    draw = noise_fn or noise.segment
    offset = 0
    for i, n in enumerate(mask.sizes):
        target = values[offset : offset + n]
        if noise.fuses(n):  # one pass, no z tensor; the same bits as the line below
            noise.add_noise(target, target, seed, i, coefficient)
        else:
            noise.add_scaled(target, draw(seed, i, n, values.device), coefficient)
        offset += n
    return values


def fused_write(tensor: torch.Tensor, segment: torch.Tensor, noise: NoiseSource, seed: int, position: int,
                scale: float) -> None:
    """Write ``segment + scale * z`` into the whole of ``tensor`` by ``noise.add_noise`` (straight into a
    float32 tensor; through a float32 temporary and one cast otherwise, as ``MaskedParams.write`` casts)."""
    if tensor.dtype == torch.float32 and tensor.is_contiguous():
        noise.add_noise(tensor.view(-1), segment, seed, position, scale)
        return
    perturbed = torch.empty_like(segment)
    noise.add_noise(perturbed, segment, seed, position, scale)
    tensor.copy_(perturbed.view_as(tensor))


def replay(
    values: torch.Tensor, mask: Mask, path: Sequence[tuple[int, float]], lr: float | Sequence[float], *,
    noise: NoiseSource,
) -> torch.Tensor:
    """Replay a virtual path of (seed, scalar) pairs drawn with ``noise`` from ``values``; returns a new vector."""
    out = values.clone()
    lrs = [lr] * len(path) if isinstance(lr, (int, float)) else list(lr)
    for (seed, scalar), step_lr in zip(path, lrs, strict=True):
        apply_step(out, mask, seed, scalar, step_lr, noise=noise)
    return out
