"""Rademacher noise in one fused pass: ``out = values + coefficient * z``, z the ``philox/rademacher`` signs.

Why. A dense ZO step adds noise to every parameter three times (+eps, -eps, update). The eager path draws z
as a float32 tensor (~10 integer ops over each Philox block, then 32 shifts per word), scales it and adds it:
several memory passes per draw. Here one compiled function per chunk computes the chunk's Philox words (4
per 128 coordinates: a cache-resident 1/32 of the chunk), then reads each value once, picks ``+c`` or ``-c``
from its bit and writes the sum: one pass over the values per draw.

Same bits on every path and device. ``c * (±1)`` is exact, so every path computes ``fl(v ± fl32(c))``, one
IEEE rounding, whether a compiler vectorises it or contracts it into a multiply-add, and the words are
integer ops. The eager path (``NoiseSource.segment``, then ``mul`` and ``add``) rounds the same, so this is
the same noise, ``philox/rademacher/v1`` [choice: used automatically for tensors of ``FUSE_MIN`` values or
more, no setting; tested bit for bit against the eager path and the NumPy reference]. A Gaussian z has no
such guarantee (a compiled Acklam transform may contract or reorder float ops), so it is not fused here.

Compiled with ``torch.compile`` (inductor: C++/OpenMP on a CPU, Triton on a GPU) on first use: seconds,
once per process (inductor caches the code on disk). If compiling or running the compiled kernels fails
(no C++ compiler, no Triton), a warning is logged once and the eager path runs instead: same bits, slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from meerkat_fl import philox

log = logging.getLogger(__name__)

WORD_VALUES = 32  # coordinates per 32-bit word; a block of 4 words covers 128
BLOCK = philox.BLOCK_VALUES["rademacher"]
# Coordinates per compiled call: a multiple of BLOCK whose words (CHUNK / 32 int64, 1 MB) stay in L2 between
# the function's two loops. A call costs ~0.1 ms of Python and guards (measured), one per tensor below CHUNK.
CHUNK = 1 << 22
FUSE_MIN = 1 << 15  # smaller tensors take the eager path: same bits, either costs a fraction of a ms [choice]
COMPILE_MIN = 1 << 12  # smaller chunks go eager: no recompile for sizes 0 and 1 (dynamo specialises them)
COMPILE = True  # tests set False to take the eager path without compiling
EAGER_CHUNK = 1 << 18  # the eager path's chunk, as noise.CHUNK: its int64 temporaries stay in cache

_compiled: dict[str, Callable] = {}
_failed: list[str] = []  # the compile error, once it happened: every later call runs eagerly


def chunk_words(key0: torch.Tensor, key1: torch.Tensor, first_block: torch.Tensor, blocks: int) -> torch.Tensor:
    """The 32-bit words (int64, ``4 * blocks``) of Philox blocks ``first_block, first_block + 1, ...``."""
    counters = torch.arange(blocks, dtype=torch.int64, device=key0.device) + first_block
    return philox.philox4x32(counters & philox.MASK32, counters >> 32, key0, key1).reshape(-1)


def add_signs(out: torch.Tensor, values: torch.Tensor, words: torch.Tensor, coefficient: torch.Tensor) -> None:
    """``out[r, b] = values[r, b] + (-c if bit b of words[r] else c)`` for [rows, 32] float32 ``values``."""
    shifts = torch.arange(WORD_VALUES, dtype=torch.int64, device=words.device)
    bits = (words.unsqueeze(1) >> shifts) & 1
    out.copy_(values + torch.where(bits == 1, -coefficient, coefficient))


def add_chunk(
    out: torch.Tensor, values: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor, first_block: torch.Tensor,
    coefficient: torch.Tensor,
) -> None:
    """``add_signs`` over [rows, 32] ``values`` whose first row starts block ``first_block``: the function that
    is compiled (one call per chunk; inductor keeps the words in a buffer of their own, not per value)."""
    rows = values.shape[0]
    words = chunk_words(key0, key1, first_block, -(-rows // 4))
    add_signs(out, values, words[:rows], coefficient)


def _compiled_pass(out: torch.Tensor, values: torch.Tensor, *args: torch.Tensor) -> bool:
    """``add_chunk`` compiled on [rows, 32] views; False if compiling or running it failed."""
    if _failed:
        return False
    try:
        if not _compiled:
            _compiled["add_chunk"] = torch.compile(add_chunk, dynamic=True)
        _compiled["add_chunk"](out.view(-1, WORD_VALUES), values.view(-1, WORD_VALUES), *args)
    except Exception as error:  # noqa: BLE001 -- no compiler, no Triton, an inductor bug: eager gives the same bits
        _failed.append(f"{type(error).__name__}: {error}")
        log.warning("torch.compile of the fused Rademacher noise failed (%s); using the eager path, same bits",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return True


def compile_failed() -> str | None:
    """Why the compiled kernels are not used (None while they are, or have not been tried)."""
    return _failed[0] if _failed else None


@torch.no_grad()
def add_rademacher(
    out: torch.Tensor, values: torch.Tensor, key: int, coefficient: float, *, compiled: bool = True
) -> None:
    """``out = values + coefficient * z`` for z the Rademacher segment of 63-bit ``key`` (1-D contiguous
    float32 tensors of one size on one device; ``out`` may be ``values``), rounded as ``fl(v + fl(c z))``.

    Compiled kernels for whole rows of 32 values in chunks of ``COMPILE_MIN`` or more; the rest (a tail, small
    chunks, no compiler) the eager way: draw z (``philox.segment_values``), scale it, add it.
    """
    device, size = values.device, values.numel()
    key0 = torch.tensor(key & philox.MASK32, dtype=torch.int64, device=device)
    key1 = torch.tensor((key >> 32) & philox.MASK32, dtype=torch.int64, device=device)
    scale = torch.tensor(coefficient, dtype=torch.float32, device=device)
    for start in range(0, size, CHUNK):
        stop = min(start + CHUNK, size)
        rows = (stop - start) // WORD_VALUES
        if compiled and COMPILE and stop - start >= COMPILE_MIN:
            first = torch.tensor(start // BLOCK, dtype=torch.int64, device=device)
            end = start + rows * WORD_VALUES
            if _compiled_pass(out[start:end], values[start:end], key0, key1, first, scale):
                start = end
        for piece in range(start, stop, EAGER_CHUNK):
            piece_stop = min(piece + EAGER_CHUNK, stop)
            z = philox.segment_values("rademacher", key, piece, piece_stop, device)
            out[piece:piece_stop] = z.mul_(coefficient).add_(values[piece:piece_stop])
