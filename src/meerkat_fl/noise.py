"""Noise sources: the perturbation z of a ZO step, drawn per trainable tensor ("segment") from a seed.

A source has a versioned name, ``<generator>/<kind>/v<version>`` (e.g. ``philox/gaussian/v1``), that is
part of a run's identity: it is saved in the resolved config, checkpoints, patches and every round plan,
and a path drawn with one source is never replayed with another (``check_noise``). Two generators:

- ``torch_cpu`` (the default, and what every run before versioned noise drew): a CPU ``torch.Generator``
  seeded by ``segment_seed(seed, position)``, ``torch.randn``, then a copy to the device. Bit-identical
  across machines on the CPU, fast there (one vectorised Mersenne Twister), but always drawn on the CPU.
- ``philox``: Philox4x32-10 keyed by the segment seed with the coordinate as counter, in integer and
  IEEE float torch ops that give the same bits on CPU and CUDA (``philox.py``), drawn on the values'
  device, in chunks. Made for GPUs: on a CPU it costs about 10x ``torch_cpu`` (many small eager ops),
  measured in ``benchmarks/zo_step.py`` [choice: so it is opt-in, ``zo.noise_generator=philox``].

Kinds: ``gaussian`` (N(0, 1), the paper's) or ``rademacher`` (±1 with equal odds, SPSA's original).
``philox/rademacher`` adds its noise to large tensors in one fused, compiled pass (``add_noise``,
``noise_fused.py``) with the same bits as drawing z: that is what brings a dense step near two forwards.

A source also owns the update's arithmetic (``add_scaled``): ``torch_cpu`` keeps the historical
``add_(z, alpha=c)`` (bit-compatible with old runs); ``philox`` rounds ``c * z`` and then the sum, two
separate ops, so no device can fuse them into a multiply-add and round differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meerkat_fl import noise_fused, philox
from meerkat_fl.errors import ConfigError

NOISE_KINDS = ("gaussian", "rademacher")
NOISE_GENERATORS = ("torch_cpu", "philox")
DEFAULT_GENERATOR = "torch_cpu"
VERSIONS = {"torch_cpu": 1, "philox": 1}
LEGACY_NOISE = "torch_cpu/gaussian/v1"  # what a checkpoint, patch or plan without a noise record was drawn with
# philox: values per vectorised call. The bits never depend on it (tested); it bounds the int64 temporaries
# (~10 x 2 MB on a CPU, where cache-sized chunks ran fastest, ~10 x 32 MB on a GPU, where each op is a kernel
# launch to amortise).
CHUNK, DEVICE_CHUNK = 1 << 18, 1 << 22
FLAT_LIMIT = 1 << 22  # philox draws masks up to this size whole (a 16 MB temporary at most), batching tensors
_MASK64 = (1 << 64) - 1


def segment_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for tensor ``position`` of the noise drawn from ``seed`` (splitmix64)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


@dataclass(frozen=True)
class NoiseSource:
    """How z is drawn from a seed; ``segment`` streams one tensor, ``draw`` fills a whole (small) mask.

    ``fused=False`` turns off the fused path of ``add_noise`` (same bits either way: for tests and benchmarks).
    """

    generator: str = DEFAULT_GENERATOR
    kind: str = "gaussian"
    fused: bool = True

    def __post_init__(self) -> None:
        if self.generator not in NOISE_GENERATORS:
            raise ConfigError(f"zo.noise_generator: must be one of {', '.join(NOISE_GENERATORS)}, got {self.generator!r}")
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"zo.noise: must be one of {', '.join(NOISE_KINDS)}, got {self.kind!r}")

    @property
    def name(self) -> str:
        """The versioned name recorded with everything drawn from this source."""
        return f"{self.generator}/{self.kind}/v{VERSIONS[self.generator]}"

    @property
    def flat_limit(self) -> int:
        """Masks up to this many values are drawn in one ``draw`` call (philox: one vectorised call beats one
        per tensor); 0 keeps ``torch_cpu`` per segment, exactly as it always ran."""
        return FLAT_LIMIT if self.generator == "philox" else 0

    def segment(self, seed: int, position: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """z for tensor ``position`` (``size`` float32 values) on ``device``; the caller may modify it."""
        key = segment_seed(seed, position)
        if self.generator == "torch_cpu":
            generator = torch.Generator(device="cpu")
            generator.manual_seed(key)
            if self.kind == "gaussian":
                z = torch.randn(size, generator=generator, dtype=torch.float32)
            else:
                z = torch.randint(0, 2, (size,), generator=generator).to(torch.float32).mul_(2.0).sub_(1.0)
            return z if torch.device(device).type == "cpu" else z.to(device)
        out = torch.empty(size, dtype=torch.float32, device=device)
        chunk = CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            out[start:stop] = philox.segment_values(self.kind, key, start, stop, device)
        return out

    def draw(self, seed: int, sizes: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """z over consecutive segments of ``sizes`` (their concatenation, float32): the same bits as
        ``segment`` for each. Philox batches small segments into one vectorised call per CHUNK values."""
        out = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        batch: list[int] = []  # consecutive small segments waiting for one philox call

        def flush() -> None:
            if batch:
                keys = [segment_seed(seed, i) for i in batch]
                out[offsets[batch[0]] : offsets[batch[-1] + 1]] = philox.many_segments_values(
                    self.kind, keys, [sizes[i] for i in batch], device)
                batch.clear()

        for position, size in enumerate(sizes):
            if self.generator != "philox" or size > CHUNK:
                flush()
                out[offsets[position] : offsets[position + 1]] = self.segment(seed, position, size, device)
                continue
            if batch and offsets[position] + size - offsets[batch[0]] > CHUNK:
                flush()
            batch.append(position)
        flush()
        return out

    def fuses(self, size: int) -> bool:
        """Whether ``add_noise`` serves a segment of ``size`` values: Philox Rademacher on a large tensor."""
        return self.fused and self.generator == "philox" and self.kind == "rademacher" and size >= noise_fused.FUSE_MIN

    def add_noise(
        self, out: torch.Tensor, values: torch.Tensor, seed: int, position: int, coefficient: float
    ) -> None:
        """``out = values + coefficient * z`` for segment ``position`` of ``seed``, in one pass where ``fuses``
        (1-D contiguous float32; ``out`` may be ``values``): the bits of ``add_scaled`` with a drawn z."""
        noise_fused.add_rademacher(out, values, segment_seed(seed, position), coefficient)

    def add_scaled(self, target: torch.Tensor, z: torch.Tensor, coefficient: float) -> None:
        """``target += coefficient * z`` in place, with this source's rounding (see the module doc)."""
        if self.generator == "torch_cpu":
            target.add_(z, alpha=coefficient)
        else:
            target.add_(torch.mul(z, coefficient))


LEGACY = NoiseSource("torch_cpu", "gaussian")


def noise_source(generator: str, kind: str) -> NoiseSource:
    """The source for ``zo.noise_generator`` and ``zo.noise`` (ConfigError on an unknown name)."""
    return NoiseSource(generator, kind)


def check_noise(expected: str, found: str | None, what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` unless ``found`` (None: recorded before versioned noise, i.e. LEGACY_NOISE) is
    ``expected``: a path is only ever replayed with the noise it was drawn with."""
    found = LEGACY_NOISE if found is None else found
    if found != expected:
        raise error(f"{what} was drawn with noise {found!r}, this run uses {expected!r}: "
                    "set zo.noise_generator / zo.noise to match")
