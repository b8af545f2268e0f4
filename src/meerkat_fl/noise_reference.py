"""A NumPy reference of the "philox" noise (``philox.py``), written independently, for bit-for-bit checks.

Not used by the library: the tests compare the torch generator's CPU bits with these, and a device check
(``benchmarks/noise_device.py --device cuda``) compares a CUDA run with the same reference. Philox uses
unsigned 64-bit products (exact: both factors are below 2^32), where the torch version needs a signed
trick; the float part repeats the same float32 operations in the same order with NumPy, whose float32
ufuncs are IEEE-rounded one op at a time.
"""

from __future__ import annotations

import numpy as np

from meerkat_fl import philox

_U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counters: np.ndarray, key0: np.ndarray | int, key1: np.ndarray | int) -> np.ndarray:
    """Random123's Philox4x32-10 on counters (lo, hi, 0, 0) given as uint64: uint64 [n, 4] of 32-bit words."""
    counters = np.asarray(counters, dtype=np.uint64)
    x = [counters & _U32, counters >> np.uint64(32), np.zeros_like(counters), np.zeros_like(counters)]
    k0, k1 = np.uint64(key0) & _U32, np.uint64(key1) & _U32
    m0, m1 = np.uint64(philox.PHILOX_M[0]), np.uint64(philox.PHILOX_M[1])
    for round_index in range(10):
        if round_index:
            k0 = (k0 + np.uint64(philox.PHILOX_W[0])) & _U32
            k1 = (k1 + np.uint64(philox.PHILOX_W[1])) & _U32
        p0, p1 = m0 * x[0], m1 * x[2]
        x = [(p1 >> np.uint64(32)) ^ x[1] ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ x[3] ^ k1, p0 & _U32]
    return np.stack(x, axis=1)


def _f(value: float) -> np.float32:
    return np.float32(value)


def _poly(x: np.ndarray, coefficients) -> np.ndarray:
    acc = x * _f(coefficients[0]) + _f(coefficients[1])
    for c in coefficients[2:]:
        acc = acc * x + _f(c)
    return acc


def _log(q: np.ndarray) -> np.ndarray:
    bits = q.view(np.int32)
    exponent = (bits >> 23) - 127
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).astype(np.int32).view(np.float32)
    high = mantissa > _f(philox.SQRT2)
    mantissa = np.where(high, mantissa * _f(0.5), mantissa)
    exponent = exponent + high.astype(np.int32)
    s = (mantissa - _f(1.0)) / (mantissa + _f(1.0))
    series = _poly(s * s, tuple(reversed(philox.LOG_SERIES))) * s
    return exponent.astype(np.float32) * _f(philox.LN2) + series


def gaussian(words: np.ndarray) -> np.ndarray:
    words = words.astype(np.uint64)
    k = (words & np.uint64(0x7FFFFFFF)).astype(np.int64)
    q = (k * 2 + 1).astype(np.float32) * _f(2.0**-33)
    t = q - _f(0.5)
    r = t * t
    x = _poly(r, philox.ACKLAM_A) * t / (_poly(r, philox.ACKLAM_B) * r + _f(1.0))
    tail = q < _f(philox.P_LOW)
    y = _log(q[tail]) * _f(-2.0)
    rt = y * _f(philox.SQRT_SLOPE) + _f(philox.SQRT_INTERCEPT)
    for _ in range(philox.SQRT_STEPS):
        rt = (y / rt + rt) * _f(0.5)
    x[tail] = _poly(rt, philox.ACKLAM_C) / (_poly(rt, philox.ACKLAM_D) * rt + _f(1.0))
    return np.where((words >> np.uint64(31)) == 1, x, -x).astype(np.float32)


def rademacher(words: np.ndarray) -> np.ndarray:
    bits = (words.astype(np.uint64).reshape(-1, 1) >> np.arange(32, dtype=np.uint64)) & np.uint64(1)
    return (np.float32(1.0) - np.float32(2.0) * bits.reshape(-1).astype(np.float32)).astype(np.float32)


def segment(kind: str, key: int, size: int) -> np.ndarray:
    """The ``size`` float32 values of the segment with 63-bit key ``key``."""
    per_block = philox.BLOCK_VALUES[kind]
    counters = np.arange((size + per_block - 1) // per_block, dtype=np.uint64)
    words = philox4x32_10(counters, key & 0xFFFFFFFF, key >> 32).reshape(-1)
    values = gaussian(words) if kind == "gaussian" else rademacher(words)
    return values[:size]
