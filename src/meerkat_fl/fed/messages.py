"""The two messages of a round and their wire format.

Down (server → client): a RoundPlan — the round, T seeds, the client's lr, and the global model either as
the new masked values, as every client's (seed, scalar) path since the client last synced, or (FedKSeed's
seed pool, ``fed/seedpool.py``) as the pool coefficients that changed since then.
Up (client → server): a ClientUpdate — exactly T float32 scalars, plus the batch losses as metrics.

Wire format: b"MKT1", a kind byte, a uint32 header length, a UTF-8 JSON header, then raw little-endian
arrays whose dtype and length the header declares. ``len(encode(msg))`` is what the byte accounting
counts. Decoding trusts nothing: size limits, dtype whitelist, lengths, finite values.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meerkat_fl.errors import MessageRejected

MAGIC = b"MKT1"
KIND_PLAN, KIND_UPDATE = 1, 2
MAX_HEADER_BYTES = 1 << 20
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8")}
MAX_POOL_SIZE = 1 << 24
MAX_COEFFICIENT = 1e5  # |pool coefficient| bound [choice]: keeps the fixed-point terms in int64 (seedpool.py)


@dataclass(frozen=True)
class ClientPath:
    """One client's virtual path in one round, as the server aggregated it."""

    round: int
    client_id: int
    weight: float  # normalised p_k among the round's accepted clients
    lr: float
    seeds: np.ndarray  # int64 [T]
    scalars: np.ndarray  # float32 [T]


@dataclass(frozen=True)
class RoundPlan:
    round: int
    client_id: int
    seeds: np.ndarray  # int64 [T]: one per local step
    lr: float
    eps: float
    batch_size: int
    values: np.ndarray | None = None  # float32 masked values (downlink "values")
    paths: tuple[ClientPath, ...] = ()  # downlink "scalars": every path since the client's last sync
    synced_round: int = -1  # the round whose global model ``paths`` start from (downlink "scalars"/"pool")
    pool_size: int = 0  # K of the seed pool the seeds come from; 0 = no pool (fresh seeds)
    pool_positions: np.ndarray | None = None  # int32, increasing: which coefficients follow (None = all K)
    pool_coefficients: np.ndarray | None = None  # float32: their current values (downlink "pool")
    noise: str | None = None  # the noise source's versioned name (noise.py); None: sent before it existed


@dataclass(frozen=True)
class ClientUpdate:
    round: int
    client_id: int
    scalars: np.ndarray  # float32 [T]
    losses: np.ndarray  # float32 [T]: batch-loss estimates (metrics only)
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _pack(kind: int, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    header = dict(header)
    header["arrays"] = []
    chunks = []
    for name, array in arrays.items():
        dtype = "float32" if array.dtype.kind == "f" else "int32" if array.dtype == np.int32 else "int64"
        data = np.ascontiguousarray(array, dtype=DTYPES[dtype]).tobytes()
        header["arrays"].append([name, dtype, int(array.size)])
        chunks.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, bytes([kind]), struct.pack("<I", len(head)), head, *chunks])


def _unpack(data: bytes, kind: int, who: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageRejected(f"{who}: message is {type(data).__name__}, not bytes")
    data = bytes(data)
    if len(data) < 9 or data[:4] != MAGIC or data[4] != kind:
        raise MessageRejected(f"{who}: not a meerkat message of the expected kind")
    (head_len,) = struct.unpack("<I", data[5:9])
    if head_len > MAX_HEADER_BYTES or 9 + head_len > len(data):
        raise MessageRejected(f"{who}: header length {head_len} is out of bounds")
    try:
        header = json.loads(data[9 : 9 + head_len])
        specs = header.pop("arrays")
        assert isinstance(header, dict) and isinstance(specs, list)
    except (ValueError, KeyError, AssertionError, AttributeError):
        raise MessageRejected(f"{who}: header is not valid JSON of the expected shape") from None
    arrays, offset = {}, 9 + head_len
    for spec in specs:
        try:
            name, dtype, count = spec
            dt = DTYPES[dtype]
            count = int(count)
        except (ValueError, TypeError, KeyError):
            raise MessageRejected(f"{who}: malformed array spec {spec!r}") from None
        end = offset + count * dt.itemsize
        if count < 0 or end > len(data):
            raise MessageRejected(f"{who}: array {name!r} runs past the end of the message")
        arrays[name] = np.frombuffer(data, dtype=dt, count=count, offset=offset)
        offset = end
    if offset != len(data):
        raise MessageRejected(f"{who}: {len(data) - offset} trailing bytes")
    return header, arrays


def _field(header: dict[str, Any], key: str, kind: type, who: str) -> Any:
    value = header.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageRejected(f"{who}: field {key!r} is missing or not {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise MessageRejected(f"{who}: field {key!r} is not finite")
    return value


def encode_plan(plan: RoundPlan) -> bytes:
    header = {
        "round": plan.round, "client_id": plan.client_id, "lr": plan.lr, "eps": plan.eps,
        "batch_size": plan.batch_size, "synced_round": plan.synced_round, "pool_size": plan.pool_size,
        "paths": [[p.round, p.client_id, p.weight, p.lr, int(p.seeds.size)] for p in plan.paths],
    }
    if plan.noise is not None:
        header["noise"] = plan.noise
    arrays = {"seeds": np.asarray(plan.seeds, dtype=np.int64)}
    if plan.values is not None:
        arrays["values"] = np.asarray(plan.values, dtype=np.float32)
    if plan.paths:
        arrays["path_seeds"] = np.concatenate([p.seeds for p in plan.paths]).astype(np.int64)
        arrays["path_scalars"] = np.concatenate([p.scalars for p in plan.paths]).astype(np.float32)
    if plan.pool_positions is not None:
        arrays["pool_positions"] = np.asarray(plan.pool_positions, dtype=np.int32)
    if plan.pool_coefficients is not None:
        arrays["pool_coefficients"] = np.asarray(plan.pool_coefficients, dtype=np.float32)
    return _pack(KIND_PLAN, header, arrays)


def decode_plan(data: bytes) -> RoundPlan:
    who = "round plan"
    header, arrays = _unpack(data, KIND_PLAN, who)
    paths, offset = [], 0
    path_seeds = arrays.get("path_seeds", np.zeros(0, np.int64))
    path_scalars = arrays.get("path_scalars", np.zeros(0, np.float32))
    for entry in header.get("paths", []):
        try:
            rnd, cid, weight, lr, count = entry
            count = int(count)
        except (ValueError, TypeError):
            raise MessageRejected(f"{who}: malformed path entry {entry!r}") from None
        if offset + count > min(path_seeds.size, path_scalars.size):
            raise MessageRejected(f"{who}: path entries exceed the path arrays")
        paths.append(ClientPath(int(rnd), int(cid), float(weight), float(lr),
                                path_seeds[offset : offset + count], path_scalars[offset : offset + count]))
        offset += count
    pool_size = header.get("pool_size", 0)
    if not isinstance(pool_size, int) or isinstance(pool_size, bool) or not 0 <= pool_size <= MAX_POOL_SIZE:
        raise MessageRejected(f"{who}: pool size {pool_size!r} is out of range (0..{MAX_POOL_SIZE})")
    noise = header.get("noise")
    if noise is not None and (not isinstance(noise, str) or not 0 < len(noise) <= 64):
        raise MessageRejected(f"{who}: field 'noise' is not a noise name")
    positions, coefficients = arrays.get("pool_positions"), arrays.get("pool_coefficients")
    if coefficients is not None:
        validate_pool(pool_size, positions, coefficients, who)
    elif positions is not None:
        raise MessageRejected(f"{who}: pool positions without pool coefficients")
    return RoundPlan(
        round=_field(header, "round", int, who), client_id=_field(header, "client_id", int, who),
        seeds=arrays.get("seeds", np.zeros(0, np.int64)), lr=_field(header, "lr", float, who),
        eps=_field(header, "eps", float, who), batch_size=_field(header, "batch_size", int, who),
        values=arrays.get("values"), paths=tuple(paths), synced_round=_field(header, "synced_round", int, who),
        pool_size=pool_size, pool_positions=positions, pool_coefficients=coefficients, noise=noise,
    )


def validate_pool(pool_size: int, positions: np.ndarray | None, coefficients: np.ndarray, who: str) -> None:
    """Raise MessageRejected unless a "pool" downlink is well formed: a pool, matching lengths, positions
    strictly increasing inside [0, K), finite coefficients within ±MAX_COEFFICIENT."""
    if pool_size < 1:
        raise MessageRejected(f"{who}: pool coefficients for a plan without a seed pool")
    if coefficients.dtype != np.float32:
        raise MessageRejected(f"{who}: pool coefficients are {coefficients.dtype}, not float32")
    if positions is None:
        if coefficients.size != pool_size:
            raise MessageRejected(f"{who}: {coefficients.size} pool coefficients without positions, "
                                  f"the pool has {pool_size}")
    else:
        if positions.dtype.kind != "i":
            raise MessageRejected(f"{who}: pool positions are {positions.dtype}, not integers")
        if positions.size != coefficients.size:
            raise MessageRejected(f"{who}: {positions.size} pool positions for {coefficients.size} coefficients")
        outside = positions[(positions < 0) | (positions >= pool_size)]
        if outside.size:
            raise MessageRejected(f"{who}: pool position {int(outside[0])} is out of range [0, {pool_size})")
        if positions.size > 1 and not (np.diff(positions.astype(np.int64)) > 0).all():
            raise MessageRejected(f"{who}: pool positions are not strictly increasing")
    if not np.isfinite(coefficients).all():
        raise MessageRejected(f"{who}: non-finite pool coefficient")
    if np.abs(coefficients).max(initial=0.0) > MAX_COEFFICIENT:
        raise MessageRejected(f"{who}: pool coefficient magnitude above the bound {MAX_COEFFICIENT:g}")


def encode_update(update: ClientUpdate) -> bytes:
    header = {"round": update.round, "client_id": update.client_id, "num_examples": update.num_examples,
              "metrics": update.metrics}
    arrays = {"scalars": np.asarray(update.scalars, dtype=np.float32),
              "losses": np.asarray(update.losses, dtype=np.float32)}
    return _pack(KIND_UPDATE, header, arrays)


def decode_update(data: bytes, who: str = "client update") -> ClientUpdate:
    header, arrays = _unpack(data, KIND_UPDATE, who)
    if "scalars" not in arrays or arrays["scalars"].dtype != np.float32:
        raise MessageRejected(f"{who}: no float32 scalars")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise MessageRejected(f"{who}: metrics must be a flat mapping of numbers")
    return ClientUpdate(
        round=_field(header, "round", int, who), client_id=_field(header, "client_id", int, who),
        scalars=arrays["scalars"], losses=arrays.get("losses", np.zeros(0, np.float32)),
        num_examples=_field(header, "num_examples", int, who), metrics=dict(metrics),
    )


def validate_update(update: ClientUpdate, plan: RoundPlan, max_abs_scalar: float) -> None:
    """Raise MessageRejected unless ``update`` answers ``plan``: same round and client, exactly one finite,
    bounded scalar per issued seed."""
    who = f"client {plan.client_id}"
    if update.round != plan.round or update.client_id != plan.client_id:
        raise MessageRejected(f"{who}: reply is for round {update.round} / client {update.client_id}, "
                              f"expected round {plan.round}")
    if update.scalars.size != plan.seeds.size:
        raise MessageRejected(f"{who}: sent {update.scalars.size} scalars for {plan.seeds.size} local steps")
    if not np.isfinite(update.scalars).all():
        raise MessageRejected(f"{who}: non-finite scalar")
    if np.abs(update.scalars).max(initial=0.0) > max_abs_scalar:
        raise MessageRejected(f"{who}: scalar magnitude above the bound {max_abs_scalar:g}")
    if update.num_examples < 0:
        raise MessageRejected(f"{who}: negative num_examples")
