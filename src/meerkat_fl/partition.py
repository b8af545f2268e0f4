"""Pure, seeded partitions of a labelled training set over K clients: iid, dirichlet, pathological, mixture.

A partition is a function of (labels, scheme, params, seed) only: the same inputs give identical arrays.
Every random choice draws from one ``np.random.default_rng(seed)``; no global RNG is touched.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.random import Generator

from meerkat_fl.errors import DataError

KINDS = ("iid", "dirichlet", "pathological", "extreme")
DIRICHLET_MAX_TRIES = 100  # whole-partition redraws before giving up on min_size
FORMAT = "meerkat_fl.partition"


@dataclass(frozen=True, eq=False)
class Partition:
    """Per client: sorted int64 indices into the dataset, and the kind of client it is."""

    clients: tuple[np.ndarray, ...]
    kinds: tuple[str, ...]
    scheme: str
    params: Mapping[str, Any]

    def __post_init__(self) -> None:
        clients = tuple(np.array(c, dtype=np.int64).reshape(-1) for c in self.clients)
        for array in clients:
            array.setflags(write=False)
        object.__setattr__(self, "clients", clients)
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "params", dict(self.params))
        if len(self.kinds) != len(clients):
            raise DataError(f"partition has {len(clients)} clients but {len(self.kinds)} kinds")
        for client, (array, kind) in enumerate(zip(clients, self.kinds)):
            if kind not in KINDS:
                raise DataError(f"client {client}: unknown kind {kind!r}; expected one of {KINDS}")
            if array.size and (array[0] < 0 or np.any(np.diff(array) <= 0)):
                raise DataError(f"client {client}: indices must be non-negative, sorted and unique")
        every = np.concatenate(clients) if clients else np.empty(0, np.int64)
        if np.unique(every).size != every.size:
            raise DataError("partition clients overlap: an example is assigned to more than one client")

    def __eq__(self, other: object) -> bool:  # arrays compared by value; leaves the class unhashable
        return isinstance(other, Partition) and self.to_json() == other.to_json()

    def sizes(self) -> np.ndarray:
        """Number of examples per client, int64 [K]."""
        return np.array([c.size for c in self.clients], dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_json`` inverts it exactly."""
        return {
            "format": FORMAT,
            "version": 1,
            "scheme": self.scheme,
            "params": dict(self.params),
            "kinds": list(self.kinds),
            "clients": [c.tolist() for c in self.clients],
        }

    @classmethod
    def from_json(cls, d: Any) -> Partition:
        """Rebuild a partition from ``to_json`` output; DataError names the malformed field."""
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != 1:
            raise DataError(f"not a partition (expected format={FORMAT!r}, version=1)")
        for key, kind in (("scheme", str), ("params", dict), ("kinds", list), ("clients", list)):
            if not isinstance(d.get(key), kind):
                raise DataError(f"partition field {key!r} is missing or not a {kind.__name__}")
        for client, indices in enumerate(d["clients"]):
            if not isinstance(indices, list) or not all(type(i) is int for i in indices):
                raise DataError(f"partition field 'clients'[{client}] is not a list of integers")
        clients = tuple(np.array(c, dtype=np.int64) for c in d["clients"])
        return cls(clients, tuple(d["kinds"]), d["scheme"], d["params"])


def _as_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a 1-D label array; return (distinct labels sorted, per-example class code in 0..C-1)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.reshape(-1).astype(np.int64)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_clients(num_clients: Any, num_examples: int) -> int:
    num_clients = _check_int("num_clients", num_clients, 1)
    if num_clients > num_examples:
        raise DataError(f"more clients ({num_clients}) than examples ({num_examples})")
    return num_clients


def _check_alpha(alpha: Any) -> float:
    if not isinstance(alpha, (int, float, np.floating)) or not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder, ties to lower index)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _iid_split(num_examples: int, weights: np.ndarray, rng: Generator) -> list[np.ndarray]:
    """Shuffle positions 0..n-1 and cut them into len(weights) runs sized by weight."""
    cuts = np.cumsum(_split_counts(num_examples, weights))[:-1]
    return np.split(rng.permutation(num_examples), cuts)


def _dirichlet_split(
    codes: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: Generator
) -> list[np.ndarray]:
    """Per class, split its shuffled positions by proportions ~ Dir(alpha·1_K); redraw until all >= min_size."""
    if codes.size < num_clients * min_size:
        need = num_clients * min_size
        raise DataError(f"dirichlet: {num_clients} clients x min_size {min_size} needs {need} examples")
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in range(int(codes.max()) + 1):
            positions = rng.permutation(np.flatnonzero(codes == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * positions.size).astype(np.int64)
            for client, chunk in enumerate(np.split(positions, cuts)):
                parts[client].append(chunk)
        clients = [np.concatenate(p) for p in parts]
        if min(c.size for c in clients) >= min_size:
            return clients
    raise DataError(
        f"dirichlet: {DIRICHLET_MAX_TRIES} tries at alpha={alpha} never gave all {num_clients} clients "
        f">= min_size {min_size} of {codes.size} examples; raise alpha, lower min_size or use fewer clients"
    )


def _build(parts: Sequence[np.ndarray], kinds: list[str], scheme: str, params: dict[str, Any]) -> Partition:
    return Partition(tuple(np.sort(p).astype(np.int64) for p in parts), tuple(kinds), scheme, params)


def iid(labels: np.ndarray, num_clients: int, seed: int, sizes: Sequence[float] | None = None) -> Partition:
    """Uniform random split using every example once; ``sizes`` gives relative client sizes (default equal)."""
    _, codes = _as_codes(labels)
    num_clients = _check_clients(num_clients, codes.size)
    weights = np.ones(num_clients) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if weights.shape != (num_clients,) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise DataError(f"iid: sizes must be {num_clients} finite positive weights, got {sizes!r}")
    counts = _split_counts(codes.size, weights)
    if counts.min() == 0:
        raise DataError(f"iid: client {int(np.argmin(counts))} would be empty with sizes {list(weights)}")
    parts = _iid_split(codes.size, weights, np.random.default_rng(_check_int("seed", seed, 0)))
    relative = None if sizes is None else weights.tolist()
    params = {"num_clients": num_clients, "seed": int(seed), "sizes": relative}
    return _build(parts, ["iid"] * num_clients, "iid", params)


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> Partition:
    """Label-skewed split using every example once: each class is divided over clients by Dir(alpha)."""
    _, codes = _as_codes(labels)
    num_clients, alpha = _check_clients(num_clients, codes.size), _check_alpha(alpha)
    min_size = _check_int("min_size", min_size, 0)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    parts = _dirichlet_split(codes, num_clients, alpha, min_size, rng)
    params = {"num_clients": num_clients, "alpha": alpha, "seed": int(seed), "min_size": min_size}
    return _build(parts, ["dirichlet"] * num_clients, "dirichlet", params)


def pathological(labels: np.ndarray, num_clients: int, labels_per_client: int, seed: int) -> Partition:
    """Each client holds exactly ``labels_per_client`` distinct labels (1 → "extreme" single-label clients).

    [choice] Labels are dealt round-robin over a seeded permutation of the classes, so every label is held by
    floor or ceil of K·k/C clients, which share its shuffled examples equally. Labels no client holds
    (K·k < C) are left out.
    """
    classes, codes = _as_codes(labels)
    num_clients = _check_int("num_clients", num_clients, 1)
    k = _check_int("labels_per_client", labels_per_client, 1)
    if k > classes.size:
        raise DataError(f"labels_per_client={k} exceeds the {classes.size} distinct labels")
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    order = rng.permutation(classes.size)
    held = [order[(client * k + np.arange(k)) % classes.size] for client in range(num_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in order:
        holders = [client for client in range(num_clients) if label in held[client]]
        positions = rng.permutation(np.flatnonzero(codes == label))
        if holders and positions.size < len(holders):
            found = f"label {classes[label]!r} has {positions.size} examples for {len(holders)} clients"
            raise DataError(f"pathological: {found}; some client would be empty of it")
        for client, chunk in zip(holders, np.array_split(positions, len(holders)) if holders else []):
            parts[client].append(chunk)
    params = {"num_clients": num_clients, "labels_per_client": k, "seed": int(seed)}
    kind = "extreme" if k == 1 else "pathological"
    return _build([np.concatenate(p) for p in parts], [kind] * num_clients, "pathological", params)


def mixture(
    labels: np.ndarray,
    num_clients: int,
    num_extreme: int,
    seed: int,
    rest: str = "dirichlet",
    alpha: float = 0.5,
) -> Partition:
    """Clients 0..num_extreme-1 hold one label each; the others share the remaining examples by ``rest``.

    [choice] Extreme labels go round-robin over a seeded permutation of the classes; each extreme client draws
    min(n // K, m_c // h_c) examples of its label c (m_c examples, h_c extreme clients on c), i.e. about the
    size of an average client. The remaining clients split every example left by dirichlet(alpha) or iid.
    """
    classes, codes = _as_codes(labels)
    num_clients = _check_clients(num_clients, codes.size)
    num_extreme = _check_int("num_extreme", num_extreme, 0)
    if num_extreme > num_clients:
        raise DataError(f"mixture: num_extreme ({num_extreme}) > num_clients ({num_clients})")
    if rest not in ("dirichlet", "iid"):
        raise DataError(f"mixture: rest must be 'dirichlet' or 'iid', got {rest!r}")
    alpha = _check_alpha(alpha)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    extreme_labels = rng.permutation(classes.size)[np.arange(num_extreme) % classes.size]
    taken = np.zeros(codes.size, dtype=bool)
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * num_extreme
    for label in np.unique(extreme_labels):
        holders = np.flatnonzero(extreme_labels == label)
        positions = rng.permutation(np.flatnonzero(codes == label))
        take = min(codes.size // num_clients, positions.size // holders.size)
        if take == 0:
            found = f"label {classes[label]!r} has {positions.size} examples"
            raise DataError(f"mixture: {found}, too few for {holders.size} extreme clients")
        for i, client in enumerate(holders):
            parts[client] = positions[i * take : (i + 1) * take]
        taken[positions[: holders.size * take]] = True
    num_rest = num_clients - num_extreme
    if num_rest:
        pool = np.flatnonzero(~taken)
        if pool.size < num_rest:
            raise DataError(f"mixture: {pool.size} examples left for {num_rest} clients after extreme ones")
        if rest == "iid":
            local = _iid_split(pool.size, np.ones(num_rest), rng)
        else:
            local = _dirichlet_split(codes[pool], num_rest, alpha, 1, rng)
        parts += [pool[p] for p in local]
    params = {"num_clients": num_clients, "num_extreme": num_extreme, "seed": int(seed)}
    params |= {"rest": rest, "alpha": alpha}
    return _build(parts, ["extreme"] * num_extreme + [rest] * num_rest, "mixture", params)


SCHEMES = {"iid": iid, "dirichlet": dirichlet, "pathological": pathological, "mixture": mixture}


def make_partition(labels: np.ndarray, scheme: str, num_clients: int, seed: int, **params: Any) -> Partition:
    """Dispatch to a scheme by name; unknown scheme or parameter names raise DataError listing the valid ones."""
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    signature = inspect.signature(SCHEMES[scheme]).parameters
    allowed = [name for name in signature if name not in ("labels", "num_clients", "seed")]
    unknown = sorted(set(params) - set(allowed))
    missing = [n for n in allowed if signature[n].default is inspect.Parameter.empty and n not in params]
    if unknown or missing:
        raise DataError(f"{scheme}: unknown params {unknown}, missing params {missing}; accepted: {allowed}")
    return SCHEMES[scheme](labels, num_clients=num_clients, seed=seed, **params)


def label_histogram(labels: np.ndarray, partition: Partition) -> np.ndarray:
    """Counts [K, C] of each distinct label (columns in sorted label order) held by each client."""
    classes, codes = _as_codes(labels)
    for client, indices in enumerate(partition.clients):
        if indices.size and indices[-1] >= codes.size:
            raise DataError(f"client {client} holds index {indices[-1]} but labels has {codes.size} examples")
    rows = [np.bincount(codes[c], minlength=classes.size) for c in partition.clients]
    return np.array(rows, dtype=np.int64).reshape(len(partition.clients), classes.size)


def format_histogram(
    labels: np.ndarray, partition: Partition, label_names: Sequence[str] | None = None
) -> str:
    """A text table: client, kind, size, per-label counts and the dominant label's share of the client."""
    classes, _ = _as_codes(labels)
    names = [str(c) for c in classes] if label_names is None else [str(n) for n in label_names]
    if len(names) != classes.size:
        raise DataError(f"label_names has {len(names)} names but labels have {classes.size} distinct values")
    counts = label_histogram(labels, partition)
    header = ["client", "kind", "size", *names, "dominant"]
    rows = []
    for client, (kind, row) in enumerate(zip(partition.kinds, counts)):
        share = f"{row.max() / row.sum():.1%}" if row.sum() else "-"
        rows.append([str(client), kind, str(row.sum()), *map(str, row), share])
    total = counts.sum(axis=0)
    rows.append(["all", "", str(total.sum()), *map(str, total), f"{total.max() / max(total.sum(), 1):.1%}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    title = f"partition {partition.scheme} " + " ".join(f"{k}={v}" for k, v in partition.params.items())
    return "\n".join([title, *lines])


def save_partition(partition: Partition, path: str | os.PathLike[str]) -> None:
    """Write the partition as JSON (atomically: a temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(partition.to_json()), encoding="utf-8")
    os.replace(tmp, path)


def load_partition(path: str | os.PathLike[str]) -> Partition:
    """Read a partition written by ``save_partition``; DataError names the file on any problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Partition.from_json(data)
    except (OSError, ValueError, DataError) as error:
        raise DataError(f"cannot load partition from {path}: {error}") from error
