"""FedKSeed (Qin et al., ICML 2024): zeroth-order steps whose seeds come from a pool of K candidate seeds.

Server and clients derive the same K seeds from the run seed, so the global model is K numbers away from
the initial one: the accumulated update coefficient c_j of each pool seed,

    w = w_0 + sum_j c_j z_j,    c_j = sum over the aggregated steps t that drew seed s_j of -lr_k * p_k * g_t,

i.e. the weighted mean of the clients' virtual paths (what Meerkat's replay computes, up to float rounding).
A client that was away catches up from the coefficients that changed since it last synced: at most K
numbers and at most K noise generations, however many rounds it missed.

Exactness [choice; the paper does not need it]. A float sum depends on its order, and a client catching up
after three rounds would add the coefficient changes in another grouping than the server did round by
round. So the masked values are not accumulated in floats: each term c_j z_j is rounded onto a grid of
2^-40 and summed as int64 (``PoolModel.accumulator``), which is exact and order-free. Moving c_j to c_j'
adds q(c_j' z_j) - q(c_j z_j), so the accumulator is always sum_j q(c_j z_j), whatever path led there,
and the values are float32(w_0 + accumulator * 2^-40), elementwise. The coefficients are float32, summed by
one function in one canonical order (client id, then step) by the server and by "scalars"-downlink
clients; the "pool" downlink sends their current values, not deltas (c + (c' - c) is not c' in floats).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meerkat_fl.errors import ConfigError, MessageRejected
from meerkat_fl.fed.messages import MAX_COEFFICIENT, ClientPath
from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource

GRID_BITS = 40  # fixed-point resolution 2^-40 ≈ 9e-13 per term, far below a float32 ulp of a typical weight
SAMPLINGS = ("uniform", "pro")
_CHUNK = 1 << 20  # elements per block when building values (bounds the float64 temporaries)


@functools.lru_cache(maxsize=8)
def _pool(run_seed: int, size: int) -> tuple[np.ndarray, dict[int, int]]:
    rng = np.random.default_rng([run_seed, size, 0xF3D5EED])
    seeds = rng.integers(0, 2**62, size=size, dtype=np.int64)
    while np.unique(seeds).size < size:  # distinct seeds (a repeat has odds ~K^2/2^63): redraw the repeats
        _, first = np.unique(seeds, return_index=True)
        repeat = np.setdiff1d(np.arange(size), first)
        seeds[repeat] = rng.integers(0, 2**62, size=repeat.size, dtype=np.int64)
    seeds.setflags(write=False)
    return seeds, {int(s): j for j, s in enumerate(seeds.tolist())}


def pool_seeds(run_seed: int, size: int) -> np.ndarray:
    """The K distinct candidate seeds (int64, read-only): a pure function of (run seed, K)."""
    return _pool(int(run_seed), int(size))[0]


def pool_index(run_seed: int, size: int) -> dict[int, int]:
    """seed -> its position in the pool."""
    return _pool(int(run_seed), int(size))[1]


def pool_choices(
    run_seed: int, round_index: int, client_id: int, count: int, size: int, probabilities: np.ndarray | None = None
) -> np.ndarray:
    """Pool positions of ``count`` local steps: uniform, or drawn with ``probabilities`` (FedKSeed-Pro)."""
    rng = np.random.default_rng([run_seed, round_index, client_id, 0xF3D5])
    if probabilities is None:
        return rng.integers(0, size, size=count, dtype=np.int64)
    return rng.choice(size, size=count, p=probabilities).astype(np.int64)


def pro_probabilities(abs_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro [code]: softmax of the min-max normalised mean |g| per seed, whose history starts at 0.

    ``abs_sum`` holds the clipped |g| summed per seed, ``count`` how many steps drew it.
    """
    mean = abs_sum / (count + 1.0)
    norm = (mean - mean.min()) / (mean.max() - mean.min() + 1e-10)
    weights = np.exp(norm - norm.max())
    return weights / weights.sum()


def accumulate(
    coefficients: np.ndarray, index_of: dict[int, int], paths: Sequence[ClientPath], who: str = "round"
) -> tuple[np.ndarray, np.ndarray]:
    """c_j += -lr_k * p_k * g_t for every step, in client-id then step order, in float32, each clamped to
    ±MAX_COEFFICIENT. Returns (new coefficients, sorted positions touched); ``coefficients`` is unchanged."""
    out = coefficients.copy()
    touched: set[int] = set()
    for path in sorted(paths, key=lambda p: p.client_id):
        scale = -float(path.lr) * float(path.weight)
        for seed, scalar in zip(path.seeds.tolist(), path.scalars.tolist()):
            j = index_of.get(int(seed))
            if j is None:
                raise MessageRejected(f"{who}: client {path.client_id}'s seed {seed} is not in the seed pool")
            value = np.float32(out[j] + np.float32(scale * scalar))
            out[j] = min(max(value, np.float32(-MAX_COEFFICIENT)), np.float32(MAX_COEFFICIENT))
            touched.add(j)
    return out, np.asarray(sorted(touched), dtype=np.int64)


def _add_on_grid(accumulator: torch.Tensor, z: torch.Tensor, new: float, old: float) -> None:
    """accumulator += q(new * z) - q(old * z), q(x) = round(x * 2^40) as int64 (ties to even).

    ``new``, ``old`` and z are float32, so each product is exact in float64: the same bits on any device.
    """
    wide = z.double()
    accumulator.add_(torch.mul(wide, new * 2.0**GRID_BITS).round_().to(torch.int64))
    if old != 0.0:
        accumulator.sub_(wide.mul_(old * 2.0**GRID_BITS).round_().to(torch.int64))


@dataclass
class PoolModel:
    """The global model as K coefficients plus sum_j q(c_j z_j) over the masked values (int64, exact)."""

    coefficients: np.ndarray  # float32 [K]
    accumulator: torch.Tensor  # int64 [masked values], in units of 2^-40

    @classmethod
    def zeros(cls, pool_size: int, mask_size: int, device: torch.device | str = "cpu") -> PoolModel:
        return cls(np.zeros(pool_size, np.float32), torch.zeros(mask_size, dtype=torch.int64, device=device))

    @property
    def size(self) -> int:
        return int(self.coefficients.size)

    def move(self, mask: Mask, seeds: np.ndarray, positions: np.ndarray, new: np.ndarray, *, noise: NoiseSource) -> int:
        """Set c_j = new for each pool position; the accumulator follows exactly. Returns noise generations."""
        generated = 0
        for j, target in zip(np.asarray(positions).tolist(), np.asarray(new, np.float32).tolist()):
            old = float(self.coefficients[j])
            self.coefficients[j] = target
            if old == target:
                continue
            offset, device = 0, self.accumulator.device
            flat = noise.draw(int(seeds[j]), mask.sizes, device) if 0 < mask.size <= noise.flat_limit else None
            for i, n in enumerate(mask.sizes):
                z = flat[offset : offset + n] if flat is not None else noise.segment(int(seeds[j]), i, n, device)
                _add_on_grid(self.accumulator[offset : offset + n], z, target, old)
                offset += n
            generated += 1
        return generated

    def values(self, initial: torch.Tensor) -> torch.Tensor:
        """float32(initial + accumulator * 2^-40), elementwise: the same bits on every party."""
        out = torch.empty_like(initial, dtype=torch.float32)
        for start in range(0, initial.numel(), _CHUNK):
            block = slice(start, start + _CHUNK)
            out[block] = (initial[block].double() + self.accumulator[block].double() * 2.0**-GRID_BITS).float()
        return out

    def clone(self) -> PoolModel:
        return PoolModel(self.coefficients.copy(), self.accumulator.clone())

    def to_bytes(self) -> bytes:
        """Little-endian float32 coefficients then int64 accumulator (Flower keeps client state as bytes)."""
        return (self.coefficients.astype("<f4").tobytes()
                + self.accumulator.detach().cpu().numpy().astype("<i8").tobytes())

    @classmethod
    def from_bytes(cls, data: bytes, mask_size: int, device: torch.device | str = "cpu") -> PoolModel:
        pool_bytes = len(data) - 8 * mask_size
        if pool_bytes < 4 or pool_bytes % 4:
            raise MessageRejected(f"a stored pool model of {len(data)} bytes does not fit a mask of {mask_size} values")
        pool_size = pool_bytes // 4
        coefficients = np.frombuffer(data, dtype="<f4", count=pool_size).astype(np.float32)
        accumulator = np.frombuffer(data, dtype="<i8", offset=4 * pool_size).copy()
        return cls(coefficients, torch.from_numpy(accumulator).to(device))


def catch_up_message(coefficients: np.ndarray, changed: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(positions or None, coefficients) for the "pool" downlink, in the smaller of two forms: every
    coefficient (4K bytes, positions implied) or the changed ones with int32 positions (8 bytes each)."""
    if 2 * changed.size >= coefficients.size:
        return None, coefficients.copy()
    return changed.astype(np.int32), coefficients[changed]


class SeedPool:
    """The server's side of FedKSeed: draws each step's seed from the pool, aggregates by coefficients, and
    answers a client's catch-up. State: the coefficients and accumulator, the round each coefficient last
    changed, and (FedKSeed-Pro) the clipped |g| sum and step count per seed."""

    def __init__(self, run_seed: int, size: int, mask: Mask, initial: torch.Tensor, *, sampling: str = "uniform",
                 pro_clip: float = 1000.0, noise: NoiseSource):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.run_seed, self.mask, self.initial, self.noise = run_seed, mask, initial, noise
        self.sampling, self.pro_clip = sampling, pro_clip
        self.seeds, self.index_of = pool_seeds(run_seed, size), pool_index(run_seed, size)
        self.model = PoolModel.zeros(size, mask.size, initial.device)
        self.changed_round = np.full(size, -1, np.int64)
        self.abs_sum = np.zeros(size, np.float64)
        self.count = np.zeros(size, np.int64)
        self.probabilities: np.ndarray | None = None  # derived from (abs_sum, count) for "pro"
        self._refresh()

    @property
    def size(self) -> int:
        return self.model.size

    def _refresh(self) -> None:
        self.probabilities = pro_probabilities(self.abs_sum, self.count) if self.sampling == "pro" else None

    def step_seeds(self, round_index: int, client_id: int, count: int) -> np.ndarray:
        """The seeds of a client's ``count`` local steps, drawn from the pool (int64)."""
        positions = pool_choices(self.run_seed, round_index, client_id, count, self.size, self.probabilities)
        return self.seeds[positions]

    def aggregate(self, round_index: int, paths: Sequence[ClientPath]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Fold one round's accepted paths into the coefficients; returns (new global values, metrics)."""
        coefficients, touched = accumulate(self.model.coefficients, self.index_of, paths)
        generated = self.model.move(self.mask, self.seeds, touched, coefficients[touched], noise=self.noise)
        self.changed_round[touched] = round_index
        if paths:
            positions = np.asarray([self.index_of[int(s)] for p in sorted(paths, key=lambda p: p.client_id)
                                    for s in p.seeds.tolist()], dtype=np.int64)
            magnitudes = np.concatenate([np.abs(p.scalars.astype(np.float64))
                                         for p in sorted(paths, key=lambda p: p.client_id)])
            np.add.at(self.abs_sum, positions, np.minimum(magnitudes, self.pro_clip))
            np.add.at(self.count, positions, 1)
        self._refresh()
        metrics = {"pool_changed": int(touched.size), "pool_noise": generated,
                   "pool_nonzero": int(np.count_nonzero(self.model.coefficients))}
        return self.model.values(self.initial), metrics

    def catch_up(self, synced_round: int) -> tuple[np.ndarray | None, np.ndarray]:
        """The coefficients that changed after ``synced_round`` (-1: all), as ``catch_up_message`` forms it."""
        return catch_up_message(self.model.coefficients, np.flatnonzero(self.changed_round > synced_round))

    def state_tensors(self, prefix: str = "server.pool.") -> dict[str, torch.Tensor]:
        return {
            prefix + "coefficients": torch.from_numpy(self.model.coefficients.copy()),
            prefix + "accumulator": self.model.accumulator,
            prefix + "changed_round": torch.from_numpy(self.changed_round.copy()),
            prefix + "abs_sum": torch.from_numpy(self.abs_sum.copy()),
            prefix + "count": torch.from_numpy(self.count.copy()),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "server.pool.") -> None:
        coefficients = tensors[prefix + "coefficients"].numpy().astype(np.float32)
        if coefficients.size != self.size:
            raise ConfigError(f"checkpoint holds a pool of {coefficients.size} seeds, the config asks for "
                                  f"{self.size}")
        self.model = PoolModel(coefficients, tensors[prefix + "accumulator"].to(self.initial.device))
        self.changed_round = tensors[prefix + "changed_round"].numpy().astype(np.int64)
        self.abs_sum = tensors[prefix + "abs_sum"].numpy().astype(np.float64)
        self.count = tensors[prefix + "count"].numpy().astype(np.int64)
        self._refresh()


# The last catch-ups, shared: (source model or None, key, result). One process that holds many clients (the
# simulator, Flower's simulation) sends them all the same message from the same synced model; the result is a
# pure function of the two (the accumulator is an exact integer sum), so the first client's move serves the
# rest. A dense pool model is 8 bytes per weight (1 GB at 135M): ten clients once held ten copies and drew the
# round's noise ten times (18 GB peak and 7 s a step in benchmarks/instruct.py). Pool models are never changed
# in place once built (``move`` runs on fresh clones only), so sharing one object is safe. Both models are held
# weakly: the cache never keeps a model alive that no client state holds (a deployed client keeps one model).
_SHARED_CATCH_UPS: list[tuple[weakref.ref | None, tuple, weakref.ref]] = []
_SHARED_CATCH_UP_SLOTS = 4


def _catch_up_key(mask: Mask, run_seed: int, pool_size: int, positions: np.ndarray | None,
                  coefficients: np.ndarray, device: torch.device | str, noise: NoiseSource) -> tuple:
    where = None if positions is None else np.asarray(positions, np.int64).tobytes()
    return (int(run_seed), int(pool_size), tuple(int(n) for n in mask.sizes), str(torch.device(device)), noise.name,
            where, np.asarray(coefficients, np.float32).tobytes())


def client_catch_up(
    model: PoolModel | None, mask: Mask, run_seed: int, pool_size: int, positions: np.ndarray | None,
    coefficients: np.ndarray, device: torch.device | str, *, noise: NoiseSource,
) -> PoolModel:
    """A client's pool model after a "pool" downlink message (``model`` is unchanged). The result may be the
    object another client of this process got from the same model and message: treat it as read-only."""
    key = _catch_up_key(mask, run_seed, pool_size, positions, coefficients, device, noise)
    for source, seen, result in _SHARED_CATCH_UPS:
        shared = result()
        # a dead source is not "no model": a fresh client (model None) matches only an entry made from None
        same_source = source is None if model is None else source is not None and source() is model
        if shared is not None and same_source and seen == key:
            return shared
    out = model.clone() if model is not None else PoolModel.zeros(pool_size, mask.size, device)
    out.move(mask, pool_seeds(run_seed, pool_size), np.arange(pool_size) if positions is None else positions,
             coefficients, noise=noise)
    _SHARED_CATCH_UPS.insert(0, (None if model is None else weakref.ref(model), key, weakref.ref(out)))
    del _SHARED_CATCH_UPS[_SHARED_CATCH_UP_SLOTS:]
    return out


def client_replay(
    model: PoolModel | None, mask: Mask, run_seed: int, pool_size: int, rounds: Sequence[Sequence[ClientPath]],
    device: torch.device | str, who: str, *, noise: NoiseSource,
) -> PoolModel:
    """A client's pool model after replaying the "scalars" downlink's paths: the server's coefficient sums,
    round by round, then one exact move of every coefficient they touched (at most K noise generations)."""
    out = model.clone() if model is not None else PoolModel.zeros(pool_size, mask.size, device)
    coefficients, touched = out.coefficients, set()
    for paths in rounds:
        coefficients, changed = accumulate(coefficients, pool_index(run_seed, pool_size), paths, who)
        touched.update(changed.tolist())
    positions = np.asarray(sorted(touched), dtype=np.int64)
    out.move(mask, pool_seeds(run_seed, pool_size), positions, coefficients[positions], noise=noise)
    return out


def check_pool_seeds(seeds: np.ndarray, run_seed: int, pool_size: int, who: str) -> None:
    """Raise MessageRejected unless every step seed of a plan is one of the pool's."""
    index_of = pool_index(run_seed, pool_size)
    for seed in np.asarray(seeds).tolist():
        if int(seed) not in index_of:
            raise MessageRejected(f"{who}: step seed {seed} is not in the seed pool of {pool_size}")

