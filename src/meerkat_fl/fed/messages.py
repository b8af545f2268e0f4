"""The two messages of a round and their wire format.

Down (server → client): a RoundPlan — the round, T seeds, the client's lr, and the global model either as
the new masked values, as every client's (seed, scalar) path since the client last synced, or (FedKSeed's
seed pool, ``fed/seedpool.py``) as the pool coefficients that changed since then.
Up (client → server): a ClientUpdate — exactly T float32 scalars, plus the finite batch losses as metrics; or,
when the plan's estimator is first order ("fo", the FedAvg upper bound), no scalars and the masked delta as
float32 ``values`` (a first-order path cannot be replayed from seeds).

Wire format: ``fed/wire.py`` (a framed JSON header plus raw arrays). Decoding trusts nothing and is total:
any byte string decodes into range-checked values or raises MessageRejected. ``validate_update`` then
checks a reply against the plan it answers, and ``validate_plan`` a plan against the client's own limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed.wire import as_float, finite, pack, read_float, read_int, unpack

KIND_PLAN, KIND_UPDATE = 1, 2
MAX_POOL_SIZE = 1 << 24
MAX_COEFFICIENT = 1e5  # |pool coefficient| bound [choice]: keeps the fixed-point terms in int64 (seedpool.py)
MAX_ROUND = MAX_CLIENT_ID = 2**31 - 1
MAX_BATCH_SIZE = 2**31 - 1  # the wire's bound; a client applies its own, far smaller one (PlanLimits)
MAX_METRICS = 64  # a reply's metrics: at most this many, names of at most MAX_METRIC_NAME characters
MAX_METRIC_NAME = 64
PLAN_FIELDS = ("round", "client_id", "lr", "eps", "batch_size", "synced_round", "pool_size", "paths", "estimator",
               "optimizer", "noise")
PLAN_ARRAYS = {"seeds": "int64", "values": "float32", "path_seeds": "int64", "path_scalars": "float32",
               "pool_positions": "int32", "pool_coefficients": "float32"}
UPDATE_FIELDS = ("round", "client_id", "num_examples", "metrics")
UPDATE_ARRAYS = {"scalars": "float32", "losses": "float32", "values": "float32"}
UPDATE_REQUIRED = ("scalars", "losses")
# What a client computes locally -> what it uploads: seed scalars (zeroth order) or a masked delta (first order)
UPLINKS = {"zo": "scalars", "fo": "values"}
MAX_NAME = 32  # characters of an estimator or optimiser name


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
    estimator: str = "zo"  # a key of UPLINKS: how the client trains (the strategy decides)
    optimizer: str = "sgd"  # first order only: the local optimiser (local.FO_OPTIMIZERS)
    noise: str | None = None  # the noise source's versioned name (noise.py); None: sent before it existed


@dataclass(frozen=True)
class ClientUpdate:
    round: int
    client_id: int
    scalars: np.ndarray  # float32 [T]
    losses: np.ndarray  # float32 [<= T]: batch-loss estimates of the steps not skipped (metrics, FedMeZO)
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    values: np.ndarray | None = None  # float32 masked delta w_k^T - w^{r-1} (first-order estimator only)


def encode_plan(plan: RoundPlan) -> bytes:
    header = {
        "round": plan.round, "client_id": plan.client_id, "lr": plan.lr, "eps": plan.eps,
        "batch_size": plan.batch_size, "synced_round": plan.synced_round, "pool_size": plan.pool_size,
        "paths": [[p.round, p.client_id, p.weight, p.lr, int(p.seeds.size)] for p in plan.paths],
    }
    if plan.estimator != "zo":  # only a first-order plan says so: zeroth-order plans keep their bytes
        header.update(estimator=plan.estimator, optimizer=plan.optimizer)
    if plan.noise is not None:
        header["noise"] = plan.noise
    arrays = {"seeds": np.asarray(plan.seeds, dtype=np.int64)}
    if plan.values is not None:
        arrays["values"] = plan.values
    if plan.paths:
        arrays["path_seeds"] = np.concatenate([p.seeds for p in plan.paths])
        arrays["path_scalars"] = np.concatenate([p.scalars for p in plan.paths])
    if plan.pool_positions is not None:
        arrays["pool_positions"] = plan.pool_positions
    if plan.pool_coefficients is not None:
        arrays["pool_coefficients"] = plan.pool_coefficients
    return pack(KIND_PLAN, header, arrays, PLAN_ARRAYS)


def decode_plan(data: bytes) -> RoundPlan:
    """The plan in ``data``, every field range-checked; MessageRejected on anything else (never another error)."""
    who = "round plan"
    header, arrays = unpack(data, KIND_PLAN, PLAN_FIELDS, PLAN_ARRAYS, who)
    round_index = read_int(header, "round", who, 0, MAX_ROUND)
    synced_round = read_int(header, "synced_round", who, -1, round_index - 1)
    if "seeds" not in arrays:
        raise MessageRejected(f"{who}: no seeds")
    paths = _decode_paths(header.get("paths", []), arrays, round_index, synced_round, who)
    pool_size = read_int(header, "pool_size", who, 0, MAX_POOL_SIZE, default=0)
    noise = header.get("noise")
    if noise is not None and (not isinstance(noise, str) or not 0 < len(noise) <= 64):
        raise MessageRejected(f"{who}: field 'noise' is not a noise name")
    positions, coefficients = arrays.get("pool_positions"), arrays.get("pool_coefficients")
    if coefficients is not None:
        validate_pool(pool_size, positions, coefficients, who)
    elif positions is not None:
        raise MessageRejected(f"{who}: pool positions without pool coefficients")
    estimator = _read_name(header, "estimator", "zo", who)
    if estimator not in UPLINKS:
        raise MessageRejected(f"{who}: unknown estimator {estimator!r} (known: {', '.join(UPLINKS)})")
    optimizer = _read_name(header, "optimizer", "sgd", who)
    values = arrays.get("values")
    if (values is not None) + bool(paths) + (coefficients is not None) > 1:
        raise MessageRejected(f"{who}: carries more than one kind of downlink")
    return RoundPlan(
        round=round_index, client_id=read_int(header, "client_id", who, 0, MAX_CLIENT_ID),
        seeds=arrays["seeds"],
        # lr 0 is legitimate (FedMeZO floors a personalised lr at 0); eps 0 would divide by zero
        lr=read_float(header, "lr", who, 0.0), eps=read_float(header, "eps", who, 0.0, low_open=True),
        batch_size=read_int(header, "batch_size", who, 1, MAX_BATCH_SIZE),
        values=None if values is None else finite(values, "values", who), paths=paths,
        synced_round=synced_round, pool_size=pool_size, pool_positions=positions, pool_coefficients=coefficients,
        estimator=estimator, optimizer=optimizer, noise=noise,
    )


def _read_name(header: dict[str, Any], key: str, default: str, who: str) -> str:
    value = header.get(key, default)
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise MessageRejected(f"{who}: field {key!r} must be a name of at most {MAX_NAME} characters")
    return value


def _decode_paths(entries: Any, arrays: dict[str, np.ndarray], round_index: int, synced_round: int,
                  who: str) -> tuple[ClientPath, ...]:
    """The "scalars" downlink's paths: rounds after ``synced_round`` and before this one, exactly tiling
    the path arrays."""
    seeds = arrays.get("path_seeds", np.zeros(0, np.int64))
    scalars = finite(arrays.get("path_scalars", np.zeros(0, np.float32)), "path scalars", who)
    if not isinstance(entries, list):
        raise MessageRejected(f"{who}: paths must be a list")
    paths, offset = [], 0
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 5:
            raise MessageRejected(f"{who}: malformed path entry {str(entry)[:80]}")
        plain = dict(zip(("round", "client_id", "count"), (entry[0], entry[1], entry[4])))
        rnd = read_int(plain, "round", who, synced_round + 1, round_index - 1)
        cid = read_int(plain, "client_id", who, 0, MAX_CLIENT_ID)
        count = read_int(plain, "count", who, 0, seeds.size - offset)
        weight = as_float(entry[2], "path weight", who, 0.0, 1.0)
        lr = as_float(entry[3], "path lr", who, 0.0)
        paths.append(ClientPath(rnd, cid, weight, lr, seeds[offset : offset + count], scalars[offset : offset + count]))
        offset += count
    if not offset == seeds.size == scalars.size:
        raise MessageRejected(f"{who}: path entries cover {offset} steps, the path arrays hold "
                              f"{seeds.size} seeds and {scalars.size} scalars")
    return tuple(paths)


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
    arrays = {"scalars": update.scalars, "losses": update.losses}
    if update.values is not None:
        arrays["values"] = np.asarray(update.values, dtype=np.float32)
    return pack(KIND_UPDATE, header, arrays, UPDATE_ARRAYS)


def decode_update(data: bytes, who: str = "client update") -> ClientUpdate:
    """The reply in ``data``, every field range-checked; MessageRejected on anything else (never another error)."""
    header, arrays = unpack(data, KIND_UPDATE, UPDATE_FIELDS, UPDATE_ARRAYS, who)
    for name in UPDATE_REQUIRED:
        if name not in arrays:
            raise MessageRejected(f"{who}: no {name}")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise MessageRejected(f"{who}: metrics must be a mapping of at most {MAX_METRICS} numbers")
    for key, value in metrics.items():
        if len(key) > MAX_METRIC_NAME:
            raise MessageRejected(f"{who}: metric name {key[:MAX_METRIC_NAME]!r}... is too long")
        metrics[key] = as_float(value, f"metric {key!r}", who, -float("inf"))
    return ClientUpdate(
        round=read_int(header, "round", who, 0, MAX_ROUND), client_id=read_int(header, "client_id", who, 0, MAX_CLIENT_ID),
        scalars=finite(arrays["scalars"], "scalars", who), losses=finite(arrays["losses"], "losses", who),
        num_examples=read_int(header, "num_examples", who, 0), metrics=metrics,
        values=None if "values" not in arrays else finite(arrays["values"], "values", who),
    )


def validate_update(update: ClientUpdate, plan: RoundPlan, max_abs_scalar: float, num_values: int = 0) -> None:
    """Raise MessageRejected unless ``update`` answers ``plan``: same round and client, and what the plan's
    estimator uploads: exactly one finite scalar of magnitude at most ``max_abs_scalar`` per issued seed
    (zeroth order), or no scalars and ``num_values`` finite delta values, one per masked coordinate (first
    order); at most one finite loss per step (a skipped step has none) and finite metrics. Checks again what
    decoding checked: updates built in memory (tests, other transports) meet the same rules."""
    who = f"client {plan.client_id}"
    if update.round != plan.round or update.client_id != plan.client_id:
        raise MessageRejected(f"{who}: reply is for round {update.round} / client {update.client_id}, "
                              f"expected round {plan.round}")
    if update.num_examples < 0:
        raise MessageRejected(f"{who}: negative num_examples")
    if UPLINKS.get(plan.estimator) == "values":
        if update.values is None or update.scalars.size:
            raise MessageRejected(f"{who}: a first-order reply carries values and no scalars")
        if update.values.size != num_values:
            raise MessageRejected(f"{who}: sent {update.values.size} values for {num_values} masked coordinates")
        if not np.isfinite(update.values).all():
            raise MessageRejected(f"{who}: non-finite value")
        if update.losses.size > plan.seeds.size or not np.isfinite(update.losses).all():
            raise MessageRejected(f"{who}: losses must be finite, at most one per step")
        return
    if update.values is not None:
        raise MessageRejected(f"{who}: a zeroth-order reply carries scalars, not values")
    if update.scalars.size != plan.seeds.size:
        raise MessageRejected(f"{who}: sent {update.scalars.size} scalars for {plan.seeds.size} local steps")
    if not np.isfinite(update.scalars).all():
        raise MessageRejected(f"{who}: non-finite scalar")
    if np.abs(update.scalars).max(initial=0.0) > max_abs_scalar:
        raise MessageRejected(f"{who}: scalar magnitude above the bound {max_abs_scalar:g}")
    if update.losses.size > plan.seeds.size:
        raise MessageRejected(f"{who}: sent {update.losses.size} losses for {plan.seeds.size} local steps")
    if not np.isfinite(update.losses).all():
        raise MessageRejected(f"{who}: non-finite loss")
    if not all(np.isfinite(v) for v in update.metrics.values()):
        raise MessageRejected(f"{who}: non-finite metric")
    if update.num_examples < 0:
        raise MessageRejected(f"{who}: negative num_examples")


@dataclass(frozen=True)
class PlanLimits:
    """What a client accepts from a plan, from its own config (a hostile or buggy server cannot make it
    allocate or loop beyond these): at most ``max_local_steps`` seeds, a batch size in [1, max_batch_size]."""

    max_batch_size: int = 1024
    max_local_steps: int = 1024


def validate_plan(plan: RoundPlan, limits: PlanLimits, who: str = "client") -> None:
    """Raise MessageRejected unless ``plan`` fits the client's limits and is well formed (finite positive
    eps, finite lr >= 0). Runs before the client allocates anything for the round."""
    if plan.seeds.size > limits.max_local_steps:
        raise MessageRejected(f"{who}: plan asks for {plan.seeds.size} local steps, this client allows at most "
                              f"{limits.max_local_steps}")
    if not 1 <= plan.batch_size <= limits.max_batch_size:
        raise MessageRejected(f"{who}: plan's batch size {plan.batch_size} is outside [1, {limits.max_batch_size}]")
    as_float(plan.eps, "plan eps", who, 0.0, low_open=True)
    as_float(plan.lr, "plan lr", who, 0.0)
    if plan.round < 0:
        raise MessageRejected(f"{who}: plan for negative round {plan.round}")
