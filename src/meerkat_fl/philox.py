"""Philox4x32-10 and its Gaussian and Rademacher values, in integer and IEEE float torch ops only.

Why these ops. A counter-based generator maps (key, counter) to bits with no state, so any coordinate's
noise can be computed anywhere, in any order, in parallel, on any device. Every integer op below
(``*``, ``>>``, ``&``, ``^``, ``+`` on int64) is exact, so the bits are the same on every device. Torch
has no unsigned 32-bit ``mulhi``: ``hi:lo = m * x`` is computed as ``(m - 2^32) * x`` (a negative
multiplier, so the product lies in (-2^63, 0] and never overflows int64), whose arithmetic shift by 32
plus ``x`` is ``hi`` and whose low 32 bits are ``lo``.

Normals come from an inverse CDF (Acklam's rational approximation, relative error 1.15e-9 in exact
arithmetic) evaluated with float32 ``+ - * /`` only, each a separate torch op: IEEE 754 requires those to be
correctly rounded (checked against NumPy on 4M values: no difference), and separate kernels cannot be fused
into a multiply-add, so CPU and CUDA round every step alike (a division is always by a tensor, never by a
scalar, which torch's CUDA kernel turns into a multiply by its reciprocal). The tail's ``log`` is computed from the float's
exponent bits and an odd series in ``(m - 1) / (m + 1)``, and its ``sqrt`` by Newton steps, with the same
four operations, not ``torch.log`` / ``torch.sqrt``: their last bit is not pinned down and differs between
CPU and CUDA libraries (this build's CPU ``sqrt`` is not even correctly rounded: it differs from NumPy's by
1 ulp on ~17% of float32 inputs, measured). Box-Muller would need ``log``, ``cos`` and ``sin``. The one
conversion, int64 -> float32 of an odd number below 2^32, is correctly rounded on both. ``noise_reference.py``
is an independent NumPy implementation the tests compare bit for bit.

Layout. Gaussian: coordinate ``i`` of a segment is word ``i % 4`` of block ``i // 4``; its top bit is the
sign and its low 31 bits ``k`` give ``q = (2k + 1) / 2^33`` in (0, 1/2], so ``|z| = -Phi^-1(q)`` is at
most 6.1. Rademacher: coordinate ``i`` is bit ``i % 32`` of word ``(i // 32) % 4`` of block ``i // 128``
(one Philox call gives 128 signs). The block index is the counter's low 64 bits; the key is the 63-bit
segment seed.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's Philox4x32 multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and key increments (golden ratio, sqrt(3) - 1)
_M_NEGATIVE = (PHILOX_M[0] - (1 << 32), PHILOX_M[1] - (1 << 32))
ROUNDS = 10
BLOCK_VALUES = {"gaussian": 4, "rademacher": 128}  # coordinates one Philox block (4 words) yields

# Acklam's inverse normal CDF coefficients (float32-representable values, lower half of the distribution)
ACKLAM_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
            -3.066479806614716e01, 2.506628277459239e00)
ACKLAM_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
            -1.328068155288572e01)
ACKLAM_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
            4.374664141464968e00, 2.938163982698783e00)
ACKLAM_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
P_LOW = 0.02425
LN2 = 0.6931471805599453
SQRT2 = 1.4142135623730951
SQRT_SLOPE, SQRT_INTERCEPT, SQRT_STEPS = 0.1054, 1.945, 4  # sqrt on [7.45, 45.7]: a chord, then Newton
LOG_SERIES = (2.0, 2.0 / 3.0, 2.0 / 5.0, 2.0 / 7.0, 2.0 / 9.0)  # log m = sum_j c_j s^(2j+1), s = (m-1)/(m+1)


def _mulhilo(x: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``PHILOX_M[which] * x`` for 32-bit ``x`` held in int64, without overflow."""
    product = x * _M_NEGATIVE[which]
    # floor(x (m - 2^32) / 2^32) + x = floor(x m / 2^32), already in [0, 2^32): no mask needed
    return (product >> 32).add_(x), product.bitwise_and_(MASK32)


def philox4x32(counter_lo: torch.Tensor, counter_hi: torch.Tensor, key0, key1) -> torch.Tensor:
    """Philox4x32-10 of counters (lo, hi, 0, 0) under key (key0, key1): int64 [n, 4] of 32-bit words.

    ``key0``/``key1`` are ints or int64 tensors broadcasting against the counters (one key per block).
    In-place ops where a fresh tensor is free to overwrite: each op is a pass over memory.
    """
    c0, c1 = counter_lo, counter_hi
    c2 = c3 = torch.zeros_like(counter_lo)
    for round_index in range(ROUNDS):
        if round_index:
            key0, key1 = (key0 + PHILOX_W[0]) & MASK32, (key1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(c0, 0)
        hi1, lo1 = _mulhilo(c2, 1)
        c0, c1, c2, c3 = hi1.bitwise_xor_(c1).bitwise_xor_(key0), lo1, hi0.bitwise_xor_(c3).bitwise_xor_(key1), lo0
    return torch.stack((c0, c1, c2, c3), dim=1)


def _f32(value: float) -> float:
    """``value`` rounded to float32 (so a scalar operand means the same on every device)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _poly(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """Horner's ((c0 x + c1) x + ...) + c_last in float32, one rounding per op."""
    acc = torch.mul(x, _f32(coefficients[0])).add_(_f32(coefficients[1]))
    for c in coefficients[2:]:
        acc.mul_(x).add_(_f32(c))
    return acc


def _poly_one(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """((c0 x + c1) x + ... + c_last) x + 1 in float32, one rounding per op (Acklam's denominators)."""
    return _poly(x, coefficients).mul_(x).add_(1.0)


def log_float32(q: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values from their exponent bits and an odd series (|err| ~ 1 ulp)."""
    bits = q.view(torch.int32)
    exponent = (bits >> 23) - 127
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # in [1, 2)
    high = mantissa > _f32(SQRT2)
    mantissa = torch.where(high, mantissa * 0.5, mantissa)  # now in [sqrt(1/2), sqrt(2)]: |s| < 0.172
    exponent = exponent + high.to(torch.int32)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    series = _poly(s * s, tuple(reversed(LOG_SERIES))).mul_(s)
    return exponent.to(torch.float32).mul_(_f32(LN2)).add_(series)


def sqrt_tail(y: torch.Tensor) -> torch.Tensor:
    """sqrt(y) for y in [7, 46] (the tail's -2 log q) by Newton's x <- (x + y / x) / 2 from a linear guess.

    Not ``torch.sqrt``: this torch build's CPU sqrt is not correctly rounded (it differs from NumPy's in
    1 ulp on ~17% of float32 inputs, measured), so it cannot promise CPU and CUDA the same bits.
    """
    x = torch.mul(y, _f32(SQRT_SLOPE)).add_(_f32(SQRT_INTERCEPT))  # within 9%: 4 steps reach float32
    for _ in range(SQRT_STEPS):
        x = (y / x).add_(x).mul_(0.5)
    return x


def gaussian_from_words(words: torch.Tensor) -> torch.Tensor:
    """Standard normals (float32) from 32-bit words held in int64: sign bit + inverse CDF of 31 bits."""
    negative = (words >> 31).bool()
    q = (words & 0x7FFFFFFF).mul_(2).add_(1).to(torch.float32).mul_(2.0**-33)  # (0, 1/2]; scaling is exact
    t = q - 0.5
    r = t * t
    x = _poly(r, ACKLAM_A).mul_(t).div_(_poly_one(r, ACKLAM_B))  # central region, x <= 0
    tail = (q < _f32(P_LOW)).nonzero().squeeze(1)
    if tail.numel():
        qt = q.index_select(0, tail)
        rt = sqrt_tail(log_float32(qt).mul_(-2.0))
        x.index_copy_(0, tail, _poly(rt, ACKLAM_C).div_(_poly_one(rt, ACKLAM_D)))
    return torch.where(negative, x, x.neg())


def rademacher_from_words(words: torch.Tensor) -> torch.Tensor:
    """±1.0 (float32) from 32-bit words: bit ``b`` of word ``w`` is value ``32 w + b`` (1 -> -1)."""
    shifts = torch.arange(32, dtype=torch.int64, device=words.device)
    bits = ((words.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    return bits.to(torch.float32).mul_(-2.0).add_(1.0)


def block_values(kind: str, key0, key1, counters: torch.Tensor) -> torch.Tensor:
    """The float32 values of whole Philox blocks (``BLOCK_VALUES[kind]`` per counter), in counter order."""
    words = philox4x32(counters & MASK32, counters >> 32, key0, key1).reshape(-1)
    return gaussian_from_words(words) if kind == "gaussian" else rademacher_from_words(words)


def segment_values(
    kind: str, key: int, start: int, stop: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Values of coordinates [start, stop) of the segment whose 63-bit key is ``key`` (float32)."""
    per_block = BLOCK_VALUES[kind]
    first, last = start // per_block, (stop - 1) // per_block
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    values = block_values(kind, key & MASK32, (key >> 32) & MASK32, counters)
    offset = start - first * per_block
    return values[offset : offset + stop - start]


def many_segments_values(
    kind: str, keys: list[int], sizes: list[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The concatenated values of several whole segments in one vectorised call (one key per block)."""
    per_block = BLOCK_VALUES[kind]
    blocks = [(n + per_block - 1) // per_block for n in sizes]
    counts = torch.tensor(blocks, dtype=torch.int64, device=device)
    key_tensor = torch.tensor(keys, dtype=torch.int64, device=device).repeat_interleave(counts)
    starts = torch.cumsum(counts, 0) - counts
    counters = torch.arange(int(counts.sum()), dtype=torch.int64, device=device) - starts.repeat_interleave(counts)
    values = block_values(kind, key_tensor & MASK32, (key_tensor >> 32) & MASK32, counters)
    block_sizes = torch.tensor(sizes, dtype=torch.int64, device=device).repeat_interleave(counts)
    lanes = torch.arange(per_block, dtype=torch.int64, device=device)
    keep = (counters.reshape(-1, 1) * per_block + lanes) < block_sizes.reshape(-1, 1)  # drop each last block's excess
    return values[keep.reshape(-1)]
