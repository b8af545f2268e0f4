"""Meerkat-vp (method doc section 4): Meerkat plus GradIP-based early stopping of extreme Non-IID clients.

The detection itself (GradIP, signals, thresholds) is pure and lives in ``meerkat_fl.vp``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.messages import ClientPath, ClientUpdate
from meerkat_fl.fed.strategies.base import ClientInstructions, Combine, RoundOutcome, UniformStrategy
from meerkat_fl.masks import Mask
from meerkat_fl.noise import LEGACY, NoiseSource
from meerkat_fl.vp import CONTROLS, DetectionSettings, Signals, path_gradip, random_stop_set


class MeerkatVPStrategy(UniformStrategy):
    """Meerkat plus GradIP-based early stopping of extreme Non-IID clients (method doc section 4).

    Calibration is counted in **local steps per client** (``calibration_steps``), not rounds: with partial
    sampling clients reach it at different rounds, and early-stopped clients grow their trajectories by one
    step a round. A client is classified after the round in which its trajectory reaches
    ``calibration_steps``; every ``recheck_every`` rounds all classified clients are re-checked on their
    whole trajectory (late window = the most recent steps, see ``late_window_at``). Flagged clients run one
    local step per round; their data pointer keeps walking, so their data is still consumed.
    With ``control="random"`` detection runs as usual and the stopped set is replaced by as many clients
    drawn from a seeded permutation of all clients (random early stopping, the paper's control).
    """

    name = "meerkat_vp"

    def __init__(self, client_ids: Sequence[int], settings: DetectionSettings, *, recheck_every: int = 20,
                 control: str = "detect", seed: int = 0, noise: NoiseSource = LEGACY):
        if control not in CONTROLS:
            raise ConfigError(f"vp.control must be one of {CONTROLS}, got {control!r}")
        self.client_ids = sorted(int(c) for c in client_ids)
        self.settings, self.recheck_every, self.control, self.seed = settings, recheck_every, control, seed
        self.noise = noise  # the run's: GradIP regenerates each step's z
        self.trajectories: dict[int, list[float]] = {}
        self.signals: dict[int, Signals] = {}  # last signals of each classified client
        self.stopped: list[int] = []  # the clients running one local step per round

    @property
    def detected(self) -> list[int]:
        return sorted(cid for cid, s in self.signals.items() if s.flagged)

    def _stopped(self) -> list[int]:
        """Who runs one step: the detected clients, or (control) as many drawn at random."""
        if self.control == "random":
            return random_stop_set(self.client_ids, len(self.detected), self.seed)
        return self.detected

    def configure(
        self, round_index: int, client_ids: Sequence[int], base: ClientInstructions
    ) -> dict[int, ClientInstructions]:
        """Flagged (or, as the control, randomly drawn) clients run one local step; the others run T."""
        return {cid: ClientInstructions(base.lr, 1) if cid in self.stopped else base for cid in client_ids}

    def observe(self, round_index: int, gradip: Mapping[int, np.ndarray]) -> dict[str, Any]:
        """Extend trajectories with one round's GradIP, classify and re-check; returns the round's metrics."""
        for cid, values in gradip.items():
            self.trajectories.setdefault(int(cid), []).extend(float(v) for v in values)
        recheck = (round_index + 1) % self.recheck_every == 0
        checked = {}
        for cid in sorted(self.trajectories):
            trajectory = self.trajectories[cid]
            if len(trajectory) < self.settings.calibration_steps:
                continue
            if cid not in self.signals:
                checked[cid] = self.settings.first_check(np.asarray(trajectory))
            elif recheck:
                checked[cid] = self.settings.signals(np.asarray(trajectory))
        self.signals.update(checked)
        self.stopped = self._stopped()
        metrics: dict[str, Any] = {"vp_stopped": list(self.stopped), "vp_detected": self.detected,
                                   "vp_classified": len(self.signals)}
        if checked:
            metrics["vp_signals"] = {str(c): [s.rho_later, s.rho_quiet] for c, s in checked.items()}
        return metrics

    def aggregate(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: Mapping[int, ClientUpdate], combine: Combine,
    ) -> RoundOutcome:
        gradip = {p.client_id: path_gradip(mask, p.seeds.tolist(), p.scalars.tolist(), noise=self.noise)[0]
                  for p in paths}
        return RoundOutcome(combine(start, paths), self.observe(round_index, gradip))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {
            "trajectories": {str(c): t for c, t in self.trajectories.items()},
            "signals": {str(c): [s.rho_later, s.rho_quiet, s.flagged, s.steps] for c, s in self.signals.items()},
        }

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        self.trajectories = {int(c): [float(v) for v in t] for c, t in state["trajectories"].items()}
        # NaN/inf are written as null by the checkpoint's JSON: they only ever mean "not flagged"
        self.signals = {
            int(c): Signals(math.nan if a is None else float(a), math.nan if b is None else float(b), bool(f), int(n))
            for c, (a, b, f, n) in state["signals"].items()
        }
        # derived, not stored: a checkpoint of a detect run can be continued as its random control, whose
        # rounds up to the first check are identical (benchmarks/vp.py shares that prefix)
        self.stopped = self._stopped()
