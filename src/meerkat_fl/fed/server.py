"""The server: samples clients, issues seeds, validates replies, replays virtual paths and aggregates.

It holds the global masked values (float32) and, for the "scalars" downlink, the paths each client has
not replayed yet; with a seed pool (FedKSeed, ``seedpool.py``) the values are derived from the pool's
coefficients. It never holds a model: evaluation writes its values into the shared model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed.aggregate import aggregate_paths, normalised_weights
from meerkat_fl.fed.downlink import server_downlink
from meerkat_fl.fed.messages import (
    ClientPath,
    ClientUpdate,
    RoundPlan,
    decode_update,
    encode_plan,
    validate_update,
)
from meerkat_fl.fed.robust import ScalarClip
from meerkat_fl.fed.seedpool import SeedPool
from meerkat_fl.fed.strategies import ClientInstructions, Strategy
from meerkat_fl.local import step_seeds
from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource, check_noise
from meerkat_fl.schedule import CONSTANT, LRSchedule

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    round: int
    rejected: dict[int, str]
    paths: list[ClientPath]
    updates: dict[int, ClientUpdate]
    bytes_down: dict[int, int]
    bytes_up: dict[int, int]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> list[int]:
        """The clients whose replies were accepted, in id order."""
        return sorted(self.updates)

    @property
    def train_loss(self) -> float | None:
        losses = [float(np.mean(u.losses)) for u in self.updates.values() if u.losses.size]
        return float(np.mean(losses)) if losses else None

    @property
    def train_loss_by_client(self) -> dict[int, float]:
        """Each accepted client's mean loss over its local steps (the two perturbed losses' mean per step)."""
        return {cid: float(np.mean(u.losses)) for cid, u in self.updates.items() if u.losses.size}


class EncodedPlans(Mapping[int, bytes]):
    """A round's plans as wire bytes, each encoded when a transport reads it and not kept.

    With the "values" downlink every plan carries the whole trainable vector (538 MB for dense SmolLM2), so
    encoding all sampled clients' plans up front held one copy per client; the in-process transport reads
    them one at a time, so one copy is alive at a time. Each plan's size is remembered for byte accounting.
    """

    def __init__(self, plans: Mapping[int, RoundPlan]):
        self._plans = plans
        self.sizes: dict[int, int] = {}

    def __getitem__(self, client_id: int) -> bytes:
        data = encode_plan(self._plans[client_id])
        self.sizes[client_id] = len(data)
        return data

    def __iter__(self) -> Iterator[int]:
        return iter(self._plans)

    def __len__(self) -> int:
        return len(self._plans)

    def size(self, client_id: int) -> int:
        """The plan's length in bytes (encoding it if no transport has read it)."""
        return self.sizes[client_id] if client_id in self.sizes else len(self[client_id])


class Server:
    """Drives rounds with a strategy; the in-process simulator and the Flower ServerApp share it."""

    def __init__(
        self, mask: Mask, values: torch.Tensor, strategy: Strategy, *, client_sizes: dict[int, int], run_seed: int,
        local_steps: int, lr: float, eps: float, batch_size: int, weighting: str = "data_size",
        downlink: str = "values", sample_fraction: float = 1.0, sample_count: int | None = None,
        max_abs_scalar: float = 1e6, seed_pool: SeedPool | None = None, clip: ScalarClip | None = None,
        noise: NoiseSource, lr_schedule: LRSchedule = CONSTANT, rounds: int = 0,
    ):
        """``lr_schedule`` scales the lr each strategy tells its clients by the round's factor over ``rounds``
        (schedule.py); the plan carries the scaled lr and the path records it, so every replay applies it."""
        self.mask, self.values, self.strategy, self.noise = mask, values, strategy, noise
        if not lr_schedule.constant and rounds < 1:
            raise ValueError("a non-constant lr schedule needs the run's number of rounds")
        self.lr_schedule, self.rounds = lr_schedule, rounds
        self.client_sizes = dict(client_sizes)
        self.run_seed, self.local_steps, self.lr, self.eps, self.batch_size = run_seed, local_steps, lr, eps, batch_size
        self.weighting, self.downlink = weighting, downlink
        self.sample_fraction, self.sample_count, self.max_abs_scalar = sample_fraction, sample_count, max_abs_scalar
        self.seed_pool = seed_pool
        self.link = server_downlink(downlink, client_sizes, seed_pool)
        self.clip = clip or ScalarClip()  # bounds each accepted client's scalars by the round's median (robust.py)
        self.round = 0
        self.rejected_total = 0

    def sample(self, round_index: int) -> list[int]:
        """The clients of a round: a pure function of (run seed, round)."""
        ids = sorted(self.client_sizes)
        count = self.sample_count or max(1, round(self.sample_fraction * len(ids)))
        if count >= len(ids):
            return ids
        rng = np.random.default_rng([self.run_seed, round_index, 0xC11E])
        return sorted(int(i) for i in rng.choice(ids, size=count, replace=False))

    def plan_for(self, client_id: int, round_index: int, told: ClientInstructions | None = None) -> RoundPlan:
        """The plan for one client: what the strategy told it (lr, T), the round's seeds and the downlink."""
        if told is None:
            told = self.configure(round_index, [client_id])[client_id]
        steps = told.local_steps
        if self.seed_pool is not None:
            seeds = self.seed_pool.step_seeds(round_index, client_id, steps)
        else:
            seeds = np.asarray(step_seeds(self.run_seed, round_index, client_id, steps), dtype=np.int64)
        common = {"round": round_index, "client_id": client_id, "seeds": seeds,
                  "lr": told.lr, "eps": self.eps, "batch_size": self.batch_size,
                  "pool_size": 0 if self.seed_pool is None else self.seed_pool.size,
                  "estimator": told.estimator, "optimizer": told.optimizer, "noise": self.noise.name}
        return RoundPlan(**common, **self.link.plan_fields(client_id, round_index, self.values))

    def instructions(self) -> ClientInstructions:
        """The run's base instructions (lr, T) that a strategy personalises."""
        return ClientInstructions(self.lr, self.local_steps)

    def configure(self, round_index: int, client_ids: list[int]) -> dict[int, ClientInstructions]:
        """What the strategy tells each client, its lr scaled by the round's schedule factor."""
        told = self.strategy.configure(round_index, client_ids, self.instructions())
        factor = self.lr_schedule.factor(round_index, self.rounds)
        if factor == 1.0:
            return told
        return {cid: replace(t, lr=t.lr * factor) for cid, t in told.items()}

    def configure_round(self) -> tuple[dict[int, RoundPlan], EncodedPlans]:
        """Plans (objects, kept to validate replies) and their bytes for this round's clients, encoded lazily."""
        told = self.configure(self.round, self.sample(self.round))
        plans = {cid: self.plan_for(cid, self.round, told[cid]) for cid in sorted(told)}
        return plans, EncodedPlans(plans)

    def aggregate_round(
        self, plans: dict[int, RoundPlan], encoded: Mapping[int, bytes],
        replies: Mapping[int, bytes | MessageRejected | None],
    ) -> RoundResult:
        """Validate replies, replay accepted clients' paths from the round's start, aggregate, advance. A reply
        the transport already refused (a Flower node answering for a client it was not sent) is a rejection."""
        updates, rejected = {}, {}
        for cid, plan in plans.items():
            reply = replies.get(cid)
            if reply is None:
                rejected[cid] = "no reply"
                continue
            if isinstance(reply, MessageRejected):
                rejected[cid] = str(reply)
                log.warning("round %d: rejected %s", self.round, reply)
                continue
            try:
                update = decode_update(reply, who=f"client {cid}")
                validate_update(update, plan, self.max_abs_scalar, self.values.numel())
            except MessageRejected as exc:
                rejected[cid] = str(exc)
                log.warning("round %d: rejected %s", self.round, exc)
                continue
            updates[cid] = update
        weights = normalised_weights({cid: self.client_sizes[cid] for cid in updates}, self.weighting) if updates else {}
        # the clipped scalars are aggregated AND sent on the "scalars" downlink: replay stays exact. A first-order
        # reply has no scalars (an empty path; its delta is in ``updates``), so the path is the seeds it answers
        scalars, clip_metrics = self.clip.apply({cid: u.scalars for cid, u in updates.items() if u.scalars.size})
        paths = [
            ClientPath(self.round, cid, weights[cid], plans[cid].lr, plans[cid].seeds[: updates[cid].scalars.size],
                       scalars.get(cid, updates[cid].scalars))
            for cid in sorted(updates)
        ]
        pool_metrics: dict[str, Any] = {}

        def combine(start: torch.Tensor, accepted: Sequence[ClientPath]) -> torch.Tensor:
            if self.seed_pool is None:
                return aggregate_paths(start, self.mask, accepted, noise=self.noise)
            # FedKSeed: sum scalars per pool seed (the same mean of virtual paths, exact in fixed point)
            values, more = self.seed_pool.aggregate(self.round, accepted)
            pool_metrics.update(more)
            return values

        outcome = self.strategy.aggregate(self.round, self.values, self.mask, paths, updates, combine)
        self.values = outcome.values
        metrics = {**outcome.metrics, **pool_metrics, **clip_metrics}
        if not self.lr_schedule.constant:  # the factor on every lr the strategy told (zo.lr, fo.lr, FedMeZO's)
            metrics["lr_factor"] = self.lr_schedule.factor(self.round, self.rounds)
        self.link.record_round(self.round, plans, {cid for cid in plans if replies.get(cid) is not None}, paths)
        self.rejected_total += len(rejected)
        result = RoundResult(
            self.round, rejected, paths, updates,
            bytes_down={cid: encoded.size(cid) if isinstance(encoded, EncodedPlans) else len(encoded[cid])
                        for cid in plans},
            bytes_up={cid: len(reply) for cid in plans if isinstance(reply := replies.get(cid), bytes)},
            metrics=metrics,
        )
        self.round += 1
        return result

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON state) for a checkpoint."""
        strategy_tensors, strategy_state = self.strategy.state_dict()
        state = {"round": self.round, "downlink": self.link.state_dict(), "rejected_total": self.rejected_total,
                 "strategy": strategy_state, "noise": self.noise.name}
        tensors = {"server.values": self.values, **{f"strategy.{k}": v for k, v in strategy_tensors.items()}}
        if self.seed_pool is not None:
            tensors.update(self.seed_pool.state_tensors())
        return tensors, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        check_noise(self.noise.name, state.get("noise"), "the checkpoint's history")
        self.values = tensors["server.values"].to(self.values.device)
        self.round = state["round"]
        self.link.load_state_dict(state["downlink"])
        self.rejected_total = state["rejected_total"]
        prefix = "strategy."
        self.strategy.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                      state["strategy"])
        if self.seed_pool is not None:
            self.seed_pool.load_state_tensors(tensors)
