"""The frame under every message, and a total reader for it.

Frame: b"MKT1", a kind byte, a uint32 header length, a UTF-8 JSON header, then raw little-endian arrays
whose name, dtype and length the header's ``arrays`` list declares, in order. ``len(frame)`` is what the
byte accounting counts.

Reading is total: any byte string either yields a header of plain finite values and zero-copy array views,
or raises MessageRejected with the reason. What is bounded, and why:
- the header's length (MAX_HEADER_BYTES) and its nesting depth (MAX_DEPTH, measured by a linear scan
  before parsing: the JSON parser recurses once per level, so a deep header would exhaust the stack);
- numbers: NaN / Infinity constants, floats that overflow to inf (1e400) and integers beyond int64 are
  refused while parsing, so no later arithmetic overflows or turns into NaN;
- duplicate keys are refused (two readers could disagree on which one counts);
- arrays: only the names and dtypes the message kind declares, each at most once, and each length is
  checked against the bytes actually present BEFORE anything is allocated; the arrays are views into the
  message, so decoding allocates at most a small multiple of the message's own size.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from meerkat_fl.errors import MessageRejected

MAGIC = b"MKT1"
PREFIX = 9  # magic, kind byte, uint32 header length
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 8  # our headers nest 3 deep ({"paths": [[...]]}); slack for new fields, far below the stack
MAX_INT = 2**63 - 1  # every integer in a header fits int64
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8")}
_MISSING = object()
# A JSON string literal, so that brackets inside strings do not count as nesting (the unrolled-loop form
# is linear: its alternatives never overlap, so the regex engine never backtracks).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


class _Malformed(ValueError):
    """Raised from inside the JSON parser's hooks; turned into MessageRejected by ``parse_header``."""


def pack(kind: int, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> bytes:
    """A frame of ``header`` plus ``arrays``, each written in the dtype ``dtypes`` names for it."""
    head = dict(header)
    head["arrays"] = []
    chunks = []
    for name, array in arrays.items():
        data = np.ascontiguousarray(array, dtype=DTYPES[dtypes[name]]).data  # joined below: one copy, not two
        head["arrays"].append([name, dtypes[name], int(np.size(array))])
        chunks.append(data)
    # allow_nan=False: a non-finite value must fail loudly at the sender, not travel as "NaN"
    text = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([MAGIC, bytes([kind]), struct.pack("<I", len(text)), text, *chunks])


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting of JSON text, string contents excluded (an upper bound when malformed)."""
    codes = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def _constant(name: str) -> None:
    raise _Malformed(f"the constant {name} is not allowed")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Malformed(f"the number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # refused before int() parses it: int64 has at most 19 digits
        raise _Malformed(f"the integer {text[:20]}... is out of range")
    value = int(text)
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise _Malformed(f"the integer {text} is out of range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Malformed("duplicate key")
    return out


def parse_header(raw: bytes, who: str) -> dict[str, Any]:
    """A JSON object of finite numbers, strings, bools, lists and objects, at most MAX_DEPTH deep."""
    if nesting_depth(raw) > MAX_DEPTH:
        raise MessageRejected(f"{who}: header nests deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_constant, parse_float=_float,
                            parse_int=_int, object_pairs_hook=_object)
    except _Malformed as exc:
        raise MessageRejected(f"{who}: header is not acceptable JSON: {exc}") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise MessageRejected(f"{who}: header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise MessageRejected(f"{who}: header is {type(header).__name__}, not an object")
    return header


def unpack(
    data: Any, kind: int, fields: tuple[str, ...], arrays_allowed: Mapping[str, str], who: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header without ``arrays``, {name: read-only view}) of a frame of ``kind``.

    ``fields`` are the header keys the kind may carry; ``arrays_allowed`` maps each array name it may
    carry to its dtype. Anything else is rejected.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageRejected(f"{who}: message is {type(data).__name__}, not bytes")
    data = bytes(data)
    if len(data) < PREFIX or data[:4] != MAGIC or data[4] != kind:
        raise MessageRejected(f"{who}: not a meerkat message of the expected kind")
    (head_len,) = struct.unpack("<I", data[5:PREFIX])
    if head_len > MAX_HEADER_BYTES or PREFIX + head_len > len(data):
        raise MessageRejected(f"{who}: header length {head_len} is out of bounds")
    header = parse_header(data[PREFIX : PREFIX + head_len], who)
    unknown = sorted(set(header) - set(fields) - {"arrays"})
    if unknown:
        raise MessageRejected(f"{who}: unknown header field {unknown[0][:40]!r}")
    specs = header.pop("arrays", None)
    if not isinstance(specs, list) or len(specs) > len(arrays_allowed):
        raise MessageRejected(f"{who}: header's array list is missing or too long")
    arrays: dict[str, np.ndarray] = {}
    offset = PREFIX + head_len
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)
                and isinstance(spec[2], int) and not isinstance(spec[2], bool)):
            raise MessageRejected(f"{who}: malformed array spec {str(spec)[:80]}")
        name, dtype, count = spec
        if name not in arrays_allowed or arrays_allowed[name] != dtype:
            raise MessageRejected(f"{who}: unexpected array {name[:40]!r} of dtype {dtype[:20]!r}")
        if name in arrays:
            raise MessageRejected(f"{who}: array {name!r} appears twice")
        end = offset + count * DTYPES[dtype].itemsize  # checked against the bytes present before allocating
        if count < 0 or end > len(data):
            raise MessageRejected(f"{who}: array {name!r} runs past the end of the message")
        arrays[name] = np.frombuffer(data, dtype=DTYPES[dtype], count=count, offset=offset)
        offset = end
    if offset != len(data):
        raise MessageRejected(f"{who}: {len(data) - offset} trailing bytes")
    return header, arrays


def read_int(header: Mapping[str, Any], key: str, who: str, low: int, high: int = MAX_INT, default: Any = _MISSING) -> int:
    """header[key] as an int in [low, high] (bools are not ints here)."""
    value = header.get(key, default)
    if value is _MISSING or not isinstance(value, int) or isinstance(value, bool):
        raise MessageRejected(f"{who}: field {key!r} is missing or not an integer")
    if not low <= value <= high:
        raise MessageRejected(f"{who}: field {key!r} = {value} is outside [{low}, {high}]")
    return value


def as_float(value: Any, what: str, who: str, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``low_open``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MessageRejected(f"{who}: {what} is missing or not a number")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise MessageRejected(f"{who}: {what} = {value!r} is outside {bracket}{low:g}, {high:g}]")
    return value


def read_float(header: Mapping[str, Any], key: str, who: str, low: float, high: float = math.inf,
               *, low_open: bool = False) -> float:
    return as_float(header.get(key), f"field {key!r}", who, low, high, low_open=low_open)


def finite(array: np.ndarray, what: str, who: str) -> np.ndarray:
    """``array`` unchanged, or MessageRejected when one of its values is NaN or infinite."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise MessageRejected(f"{who}: non-finite value in {what}")
    return array
