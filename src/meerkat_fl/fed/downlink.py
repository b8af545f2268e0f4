"""Downlinks: how a client gets the round's starting global values. One object per kind, a server side and a
client side each (method doc section 3):

- ``values``: the server sends the masked values themselves (4 bytes per trainable value).
- ``scalars``: the server sends every client's (seed, scalar) path since this client's last sync and the client
  replays them, bit for bit as the server aggregated them (with a seed pool: the pool's coefficient sums).
- ``pool`` (FedKSeed): the server sends the seed pool's coefficients that changed since the client's last sync,
  at most K numbers however many rounds it missed.

The server side decides a plan's downlink fields and keeps the bookkeeping (which round each client holds, the
paths not yet replayed by everyone); the client side turns a plan and a ``ClientState`` into the values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed.aggregate import aggregate_paths
from meerkat_fl.fed.messages import ClientPath, RoundPlan
from meerkat_fl.fed.seedpool import SeedPool, client_catch_up, client_replay
from meerkat_fl.fed.state import ClientState
from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource


class ServerDownlink(Protocol):
    name: str

    def plan_fields(self, client_id: int, round_index: int, values: torch.Tensor) -> dict[str, Any]: ...

    def record_round(self, round_index: int, planned: Iterable[int], answered: set[int],
                     paths: Sequence[ClientPath]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ValuesDownlink:
    """Every plan carries the global values; the server keeps no per-client bookkeeping."""

    name = "values"

    def plan_fields(self, client_id: int, round_index: int, values: torch.Tensor) -> dict[str, Any]:
        return {"values": values.detach().cpu().numpy()}

    def record_round(self, round_index: int, planned: Iterable[int], answered: set[int],
                     paths: Sequence[ClientPath]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class _Synced:
    """Which round each client holds. A client that did not answer may have lost its state (a restarted node):
    it is sent everything from round 0 next time (-1), and rebuilds exactly."""

    def __init__(self, client_ids: Iterable[int]):
        self.client_synced = {int(k): -1 for k in client_ids}

    def _mark(self, round_index: int, planned: Iterable[int], answered: set[int]) -> None:
        for cid in planned:
            self.client_synced[cid] = round_index - 1 if cid in answered else -1

    def state_dict(self) -> dict[str, Any]:
        return {"client_synced": {str(k): v for k, v in self.client_synced.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.client_synced = {int(k): int(v) for k, v in state["client_synced"].items()}


class ScalarsDownlink(_Synced):
    """Plans carry the paths of every round since the client's last sync; history older than every client's
    sync is dropped."""

    name = "scalars"

    def __init__(self, client_ids: Iterable[int], pool_size: int = 0):
        super().__init__(client_ids)
        self.pool_size = pool_size
        self.history: dict[int, list[ClientPath]] = {}

    def plan_fields(self, client_id: int, round_index: int, values: torch.Tensor) -> dict[str, Any]:
        synced = self.client_synced[client_id]
        paths = tuple(p for r in range(synced + 1, round_index) for p in self.history.get(r, []))
        return {"paths": paths, "synced_round": synced}

    def record_round(self, round_index: int, planned: Iterable[int], answered: set[int],
                     paths: Sequence[ClientPath]) -> None:
        self.history[round_index] = list(paths)
        self._mark(round_index, planned, answered)
        oldest = min(self.client_synced.values())
        self.history = {r: p for r, p in self.history.items() if r > oldest}

    def state_dict(self) -> dict[str, Any]:
        history = {str(r): [[p.client_id, p.weight, p.lr, p.seeds.tolist(), p.scalars.tolist()] for p in paths]
                   for r, paths in self.history.items()}
        return {**super().state_dict(), "history": history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = {
            int(r): [ClientPath(int(r), cid, w, lr, np.asarray(s, dtype=np.int64), np.asarray(g, dtype=np.float32))
                     for cid, w, lr, s, g in paths]
            for r, paths in state["history"].items()
        }


class PoolDownlink(_Synced):
    """Plans carry the seed pool's coefficients that changed after the client's last sync (at most K)."""

    name = "pool"

    def __init__(self, client_ids: Iterable[int], seed_pool: SeedPool):
        super().__init__(client_ids)
        self.seed_pool = seed_pool

    def plan_fields(self, client_id: int, round_index: int, values: torch.Tensor) -> dict[str, Any]:
        synced = self.client_synced[client_id]
        positions, coefficients = self.seed_pool.catch_up(synced)
        return {"synced_round": synced, "pool_positions": positions, "pool_coefficients": coefficients}

    def record_round(self, round_index: int, planned: Iterable[int], answered: set[int],
                     paths: Sequence[ClientPath]) -> None:
        self._mark(round_index, planned, answered)


def server_downlink(name: str, client_ids: Iterable[int], seed_pool: SeedPool | None) -> ServerDownlink:
    """The server side of downlink ``name`` (``pool`` needs a seed pool)."""
    if name == "values":
        return ValuesDownlink()
    if name == "scalars":
        return ScalarsDownlink(client_ids, 0 if seed_pool is None else seed_pool.size)
    if name == "pool":
        if seed_pool is None:
            raise ValueError('the "pool" downlink needs a seed pool')
        return PoolDownlink(client_ids, seed_pool)
    raise ValueError(f"unknown downlink {name!r} (values, scalars, pool)")


# --- the client side ------------------------------------------------------------------------------------


def client_sync(
    plan: RoundPlan, state: ClientState, *, mask: Mask, mask_size: int, initial: torch.Tensor, run_seed: int,
    who: str, noise: NoiseSource, buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ClientState]:
    """(the round's starting values, the client's new state) from a plan; ``state`` is not modified, so a plan
    that does not fit is rejected (MessageRejected) before anything changes. ``buffer``: a CPU float32 tensor of
    the mask's size that a "values" plan's start is copied into (and returned) instead of fresh memory."""
    device = initial.device
    if plan.pool_size and state.pool is not None and state.pool.size != plan.pool_size:
        raise MessageRejected(f"{who} holds a pool of {state.pool.size} seeds, the plan has {plan.pool_size}")
    new = ClientState(state.epoch, state.position, state.synced_round, state.values, state.pool)
    if plan.values is not None:  # "values"
        if plan.values.size != mask_size:
            raise MessageRejected(f"round plan carries {plan.values.size} values, the mask has {mask_size}")
        if (buffer is not None and buffer.device.type == "cpu" and buffer.dtype == torch.float32
                and buffer.numel() == mask_size):
            np.copyto(buffer.numpy(), plan.values)  # dtype float32 both: a plain copy, no cast
            return buffer.to(device), new
        return torch.from_numpy(plan.values.copy()).to(device), new
    if plan.pool_coefficients is not None:  # "pool": current coefficients of all that changed after synced_round
        if plan.synced_round > state.synced_round:
            raise MessageRejected(f"{who} holds round {state.synced_round}, the pool coefficients "
                                  f"only cover changes after round {plan.synced_round}")
        new.pool = client_catch_up(state.pool, mask, run_seed, plan.pool_size, plan.pool_positions,
                                   plan.pool_coefficients, device, noise=noise)
        new.synced_round = plan.round - 1
        return new.pool.values(initial), new
    # "scalars"
    if plan.synced_round == -1 and state.synced_round != -1:  # the server lost track of us (a round without
        # our reply): rebuild from the initial values, exactly as the server aggregated them
        new.values, new.pool, new.synced_round = None, None, -1
    if plan.synced_round != new.synced_round:
        raise MessageRejected(f"{who} holds round {new.synced_round}, the plan replays from round {plan.synced_round}")
    by_round: dict[int, list[ClientPath]] = defaultdict(list)
    for path in plan.paths:
        by_round[path.round].append(path)
    rounds = [by_round[r] for r in sorted(by_round)]
    new.synced_round = plan.round - 1
    if plan.pool_size:  # the server's coefficient sums, round by round
        new.pool = client_replay(new.pool, mask, run_seed, plan.pool_size, rounds, device, who, noise=noise)
        return new.pool.values(initial), new
    values = new.values if new.values is not None else initial
    for paths in rounds:
        values = aggregate_paths(values, mask, paths, noise=noise)
    new.values = values
    return values.clone(), new
