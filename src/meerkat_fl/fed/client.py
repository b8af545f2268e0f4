"""A federated client: its data indices, its data pointer, and (for the "scalars" downlink) its copy of
the global masked values, or with a seed pool (FedKSeed) its copy of the pool's coefficients and exact
accumulator. It holds no model: the runtime lends it the shared one, so switching clients costs
O(masked values), never a model copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed.downlink import client_sync
from meerkat_fl.fed.messages import ClientUpdate, PlanLimits, RoundPlan, validate_plan
from meerkat_fl.fed.seedpool import PoolModel, check_pool_seeds
from meerkat_fl.fed.state import ClientState
from meerkat_fl.local import FO_OPTIMIZERS, DataPointer, local_train, local_train_fo
from meerkat_fl.noise import check_noise
from meerkat_fl.tasks import EncodedSplit, Scorer
from meerkat_fl.zo import MaskedParams


@dataclass
class ClientRuntime:
    """What a client borrows to train: the shared model (through its mask), the scorer and the data."""

    params: MaskedParams
    scorer: Scorer
    train: EncodedSplit
    initial_values: torch.Tensor  # the base model's masked values: every client's starting point
    # The "values" downlink's landing buffer, reused by every client of this runtime: a round's start is copied
    # into it rather than into fresh memory (for a dense mask, 538 MB of page faults per client, ~1 s on 2 CPU
    # cores). Clients run one after another and none keeps its start after ``fit`` returns.
    sync_buffer: torch.Tensor | None = None


class Client:
    def __init__(self, client_id: int, indices: np.ndarray, run_seed: int, limits: PlanLimits | None = None):
        self.client_id, self.run_seed = client_id, run_seed
        self.limits = limits or PlanLimits()  # the client's own bounds on what a plan may ask of it
        self.indices = np.asarray(indices, dtype=np.int64)
        self.pointer = DataPointer(len(self.indices), seed=int(np.random.default_rng([run_seed, client_id]).integers(2**62)))
        self.synced = ClientState()  # what the downlink left: the round held and its model ("scalars"/"pool")

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    @property
    def synced_round(self) -> int:
        return self.synced.synced_round

    @property
    def values(self) -> torch.Tensor | None:
        return self.synced.values

    @property
    def pool(self) -> PoolModel | None:
        return self.synced.pool

    def sync(self, plan: RoundPlan, runtime: ClientRuntime) -> torch.Tensor:
        """The round's starting global values, through the plan's downlink (``fed/downlink.py``). A plan that
        does not fit is rejected before any state changes."""
        who = f"client {self.client_id}"
        validate_plan(plan, self.limits, who)  # before anything is allocated for the round
        check_noise(runtime.params.noise.name, plan.noise, f"{who}: the round plan", MessageRejected)
        if plan.pool_size:
            check_pool_seeds(plan.seeds, self.run_seed, plan.pool_size, who)
        if plan.values is not None and runtime.sync_buffer is None:
            runtime.sync_buffer = torch.empty_like(runtime.initial_values)
        values, self.synced = client_sync(plan, self.synced, mask=runtime.params.mask, mask_size=runtime.params.size,
                                          initial=runtime.initial_values, run_seed=self.run_seed, who=who,
                                          noise=runtime.params.noise, buffer=runtime.sync_buffer)
        return values

    def fit(self, plan: RoundPlan, runtime: ClientRuntime) -> ClientUpdate:
        """Run ``len(plan.seeds)`` local steps on this client's data with the plan's estimator."""
        trainer = LOCAL_TRAINERS.get(plan.estimator)
        if trainer is None:
            raise MessageRejected(f"client {self.client_id}: no local trainer for estimator {plan.estimator!r}")
        return trainer(self, plan, runtime, self.sync(plan, runtime))

    def fit_zo(self, plan: RoundPlan, runtime: ClientRuntime, values: torch.Tensor) -> ClientUpdate:
        """One ZO step per seed; returns exactly that many scalars."""
        device = runtime.params.device

        def batch_loss(local_rows: np.ndarray) -> float:
            return runtime.scorer.loss(runtime.train.batch(self.indices[local_rows], device))

        steps = local_train(runtime.params, values, plan.seeds.tolist(), lr=plan.lr, eps=plan.eps,
                            batch_loss=batch_loss, pointer=self.pointer, batch_size=plan.batch_size)
        return ClientUpdate(
            round=plan.round, client_id=self.client_id,
            scalars=np.asarray([s.scalar for s in steps], dtype=np.float32),
            # a skipped step has no finite loss: it is left out (and counted), so every loss sent is finite
            losses=np.asarray([s.loss for s in steps if not s.skipped], dtype=np.float32),
            num_examples=self.num_examples,
            metrics={"skipped_steps": float(sum(s.skipped for s in steps))},
        )

    def fit_fo(self, plan: RoundPlan, runtime: ClientRuntime, values: torch.Tensor) -> ClientUpdate:
        """``len(plan.seeds)`` backprop steps (the seeds only count them); returns the masked delta as values."""
        if plan.optimizer not in FO_OPTIMIZERS:
            raise MessageRejected(f"client {self.client_id}: unknown optimizer {plan.optimizer!r} "
                                  f"(known: {', '.join(FO_OPTIMIZERS)})")
        device, start = runtime.params.device, values.clone()

        def batch_loss(local_rows: np.ndarray) -> torch.Tensor:
            return runtime.scorer.loss_tensor(runtime.train.batch(self.indices[local_rows], device))

        steps = local_train_fo(runtime.params, values, int(plan.seeds.size), lr=plan.lr, optimizer=plan.optimizer,
                               batch_loss=batch_loss, pointer=self.pointer, batch_size=plan.batch_size)
        return ClientUpdate(
            round=plan.round, client_id=self.client_id, scalars=np.zeros(0, dtype=np.float32),
            losses=np.asarray([s.loss for s in steps if not s.skipped], dtype=np.float32),  # finite only
            num_examples=self.num_examples,
            metrics={"skipped_steps": float(sum(s.skipped for s in steps))},
            values=(values - start).cpu().numpy(),
        )

    def state(self) -> ClientState:
        """Everything this client carries between rounds (``fed/state.py`` encodes it)."""
        pointer = self.pointer.state()
        return ClientState(pointer["epoch"], pointer["position"], self.synced.synced_round,
                           self.synced.values, self.synced.pool)

    def load_state(self, state: ClientState) -> None:
        self.pointer.load_state({"epoch": state.epoch, "position": state.position})
        self.synced = ClientState(synced_round=state.synced_round, values=state.values, pool=state.pool)


# estimator (messages.UPLINKS) -> how a client trains locally; the strategy picks the estimator in its plans
LOCAL_TRAINERS: dict[str, Callable[[Client, RoundPlan, ClientRuntime, torch.Tensor], ClientUpdate]] = {
    "zo": Client.fit_zo,
    "fo": Client.fit_fo,
}
