"""GradIP and Meerkat-vp (method doc section 4): watch each client's virtual path, early-stop extreme clients.

GradIP of one replayed local step is ``g * <(grad f_p)_m, z>``: the inner product of the masked mean
pre-training gradient the mask stores with the step's ZO gradient estimate ``g * z``. The server already
holds every (seed, scalar) pair, so GradIP needs no forward pass: one regeneration of ``z`` from the seed
(segment by segment, exactly as ``zo.apply_step`` does) and one dot product, O(masked values) per step.

Detection works on a client's *trajectory*: its GradIP values in the order the client ran its steps,
concatenated over the rounds it took part in. Everything below the strategy class is a pure function of
arrays, so it is tested on synthetic trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.messages import ClientPath, ClientUpdate
from meerkat_fl.fed.strategies import MeerkatStrategy
from meerkat_fl.masks import Mask
from meerkat_fl.zo import segment_noise

GRADIP_LOG = "gradip.jsonl"  # one line per (round, client): {"round", "client_id", "gradip": [...], ...}
CONTROLS = ("detect", "random")


# --- GradIP -------------------------------------------------------------------------------------------


def _require_pretrain_grad(mask: Mask) -> tuple[torch.Tensor, ...]:
    if mask.pretrain_grad is None:
        raise ConfigError(
            f"GradIP needs the masked pre-training gradient, which a {mask.kind!r} mask does not store: "
            "use mask.kind=sensitive (or a mask file built with it)"
        )
    return mask.pretrain_grad


def projection(mask: Mask, seed: int) -> tuple[float, float]:
    """(<(grad f_p)_m, z>, ||z||) for the noise ``z`` of ``seed``, accumulated segment by segment in float64."""
    grads = _require_pretrain_grad(mask)
    dot, z_squared = 0.0, 0.0
    for position, (grad, size) in enumerate(zip(grads, mask.sizes)):
        z = segment_noise(seed, position, size)  # the very noise the client and the replay use
        dot += float(torch.dot(grad, z).double())
        z_squared += float(torch.dot(z, z).double())
    return dot, math.sqrt(z_squared)


def pretrain_grad_norm(mask: Mask) -> float:
    """||(grad f_p)_m||_2 over the masked values."""
    return math.sqrt(sum(float(torch.dot(g, g).double()) for g in _require_pretrain_grad(mask)))


def path_gradip(
    mask: Mask, seeds: Sequence[int], scalars: Sequence[float], *, cosine: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed GradIP of every step of a path, float64 [T]; with ``cosine``, also cos(angle) between
    (grad f_p)_m and the ZO estimate g*z, in [-1, 1] (0 for a zero scalar) — for analysis only."""
    gradip = np.zeros(len(seeds), dtype=np.float64)
    cosines = np.zeros(len(seeds), dtype=np.float64) if cosine else None
    norm = pretrain_grad_norm(mask) if cosine else 0.0
    for step, (seed, scalar) in enumerate(zip(seeds, scalars, strict=True)):
        dot, z_norm = projection(mask, int(seed))
        gradip[step] = float(scalar) * dot
        if cosines is not None and scalar != 0.0 and norm > 0.0 and z_norm > 0.0:
            cosines[step] = math.copysign(1.0, float(scalar)) * dot / (norm * z_norm)
    return gradip, cosines


def gradip_records(round_number: int, mask: Mask, paths: Sequence[ClientPath], *, cosine: bool = False) -> list[dict]:
    """The ``gradip.jsonl`` lines of one round: per accepted client, its steps' signed GradIP (|GradIP| is
    the absolute form) and optionally the cosine. ``round_number`` is 1-based, as in metrics.jsonl."""
    records = []
    for path in sorted(paths, key=lambda p: p.client_id):
        gradip, cosines = path_gradip(mask, path.seeds.tolist(), path.scalars.tolist(), cosine=cosine)
        record: dict[str, Any] = {"round": round_number, "client_id": path.client_id, "gradip": gradip.tolist()}
        if cosines is not None:
            record["cosine"] = cosines.tolist()
        records.append(record)
    return records


def trajectories_from_records(records: Sequence[Mapping[str, Any]]) -> dict[int, np.ndarray]:
    """Per client, its GradIP values in step order (rounds ascending, steps in order within a round)."""
    by_client: dict[int, list[tuple[int, list[float]]]] = {}
    for record in records:
        by_client.setdefault(int(record["client_id"]), []).append((int(record["round"]), record["gradip"]))
    return {
        cid: np.asarray([v for _, values in sorted(rounds, key=lambda x: x[0]) for v in values], dtype=np.float64)
        for cid, rounds in sorted(by_client.items())
    }


# --- Detection -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signals:
    """A client's detection signals on one trajectory (NaN where a window is empty or the early mean is 0)."""

    rho_later: float  # mean |GradIP| in the early window / mean |GradIP| in the late window
    rho_quiet: float  # share of late-window steps with |GradIP| < quiet_factor * early mean
    flagged: bool
    steps: int  # trajectory length the signals were computed on


def late_window_at(length: int, late_window: tuple[int, int]) -> tuple[int, int]:
    """The late window for a trajectory of ``length`` steps: its last ``late_end - late_start`` steps.

    [choice] At the first check of a calibration trajectory (``length == late_end``, e.g. 100 steps with the
    window (50, 100)) this *is* the configured window; at later re-checks it slides to the most recent
    steps, so a client that settles after calibration is caught and one whose GradIP wakes up is released.
    """
    start, end = late_window
    if length <= end:
        return start, end
    return length - (end - start), length


def detection_signals(
    trajectory: np.ndarray,
    early_window: tuple[int, int],
    late_window: tuple[int, int],
    quiet_factor: float,
    rho_later: float,
    rho_quiet: float,
) -> Signals:
    """rho_later, rho_quiet and the flag for one trajectory; windows are [start, end) step indices, clipped
    to the trajectory. Flag iff rho_later >= ``rho_later`` and rho_quiet >= ``rho_quiet`` (NaN never flags).

    [choice] rho_quiet counts quiet steps in the late window only: the early window is the reference level
    and would dilute the share with steps that cannot be quiet by construction.
    """
    magnitude = np.abs(np.asarray(trajectory, dtype=np.float64))
    early = magnitude[early_window[0] : early_window[1]]
    late = magnitude[late_window[0] : late_window[1]]
    if early.size == 0 or late.size == 0:
        return Signals(math.nan, math.nan, False, int(magnitude.size))
    early_mean, late_mean = float(early.mean()), float(late.mean())
    if early_mean == 0.0:
        return Signals(math.nan, math.nan, False, int(magnitude.size))
    later = math.inf if late_mean == 0.0 else early_mean / late_mean
    quiet = float(np.mean(late < quiet_factor * early_mean))
    return Signals(later, quiet, bool(later >= rho_later and quiet >= rho_quiet), int(magnitude.size))


@dataclass(frozen=True)
class DetectionSettings:
    """The [vp] knobs detection needs, as plain values; defaults live in config.VPConfig only."""

    calibration_steps: int
    early_window: tuple[int, int]
    late_window: tuple[int, int]
    quiet_factor: float
    rho_later: float
    rho_quiet: float

    @classmethod
    def from_vp(cls, vp) -> DetectionSettings:
        """From a config.VPConfig (the [vp] section)."""
        return cls(vp.calibration_steps, tuple(vp.early_window), tuple(vp.late_window), vp.quiet_factor,
                   vp.rho_later, vp.rho_quiet)

    def signals(self, trajectory: np.ndarray) -> Signals:
        """Signals on a trajectory with the late window placed by ``late_window_at``."""
        late = late_window_at(len(trajectory), self.late_window)
        return detection_signals(trajectory, self.early_window, late, self.quiet_factor, self.rho_later,
                                 self.rho_quiet)

    def first_check(self, trajectory: np.ndarray) -> Signals:
        """Signals on the calibration trajectory (the first ``calibration_steps`` steps): what the strategy
        decides when a client finishes calibration, and what ``meerkat gradip`` reports."""
        return self.signals(np.asarray(trajectory)[: self.calibration_steps])


def precision_recall(flagged: Sequence[int], extreme: Sequence[int]) -> tuple[float, float]:
    """Detection precision (NaN when nothing is flagged) and recall (NaN when no client is extreme)."""
    flagged_set, extreme_set = set(flagged), set(extreme)
    hits = len(flagged_set & extreme_set)
    precision = hits / len(flagged_set) if flagged_set else math.nan
    recall = hits / len(extreme_set) if extreme_set else math.nan
    return precision, recall


def random_stop_set(client_ids: Sequence[int], count: int, seed: int) -> list[int]:
    """The random early-stopping control: the first ``count`` clients of one seeded permutation, so the
    set only grows or shrinks at its end as the count changes (no churn), and is the same on resume."""
    order = np.random.default_rng([seed, 0x5709]).permutation(sorted(client_ids))
    return sorted(int(c) for c in order[:count])


# --- The strategy --------------------------------------------------------------------------------------


class MeerkatVPStrategy(MeerkatStrategy):
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
                 control: str = "detect", seed: int = 0):
        if control not in CONTROLS:
            raise ConfigError(f"vp.control must be one of {CONTROLS}, got {control!r}")
        self.client_ids = sorted(int(c) for c in client_ids)
        self.settings, self.recheck_every, self.control, self.seed = settings, recheck_every, control, seed
        self.trajectories: dict[int, list[float]] = {}
        self.signals: dict[int, Signals] = {}  # last signals of each classified client
        self.stopped: list[int] = []  # the clients running one local step per round

    @classmethod
    def from_config(cls, cfg) -> MeerkatVPStrategy:
        vp = cfg.vp
        settings = DetectionSettings.from_vp(vp)
        return cls(range(cfg.fed.num_clients), settings, recheck_every=vp.recheck_every, control=vp.control,
                   seed=cfg.run.seed)

    @property
    def detected(self) -> list[int]:
        return sorted(cid for cid, s in self.signals.items() if s.flagged)

    def _stopped(self) -> list[int]:
        """Who runs one step: the detected clients, or (control) as many drawn at random."""
        if self.control == "random":
            return random_stop_set(self.client_ids, len(self.detected), self.seed)
        return self.detected

    def local_steps(self, client_id: int, default: int) -> int:
        return 1 if client_id in self.stopped else default

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

    def after_round(
        self, round_index: int, start: torch.Tensor, mask: Mask, paths: Sequence[ClientPath],
        updates: dict[int, ClientUpdate],
    ) -> dict[str, Any]:
        gradip = {p.client_id: path_gradip(mask, p.seeds.tolist(), p.scalars.tolist())[0] for p in paths}
        return self.observe(round_index, gradip)

    def state_dict(self) -> dict[str, Any]:
        return {
            "trajectories": {str(c): t for c, t in self.trajectories.items()},
            "signals": {str(c): [s.rho_later, s.rho_quiet, s.flagged, s.steps] for c, s in self.signals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trajectories = {int(c): [float(v) for v in t] for c, t in state["trajectories"].items()}
        # NaN/inf are written as null by the checkpoint's JSON: they only ever mean "not flagged"
        self.signals = {
            int(c): Signals(math.nan if a is None else float(a), math.nan if b is None else float(b), bool(f), int(n))
            for c, (a, b, f, n) in state["signals"].items()
        }
        # derived, not stored: a checkpoint of a detect run can be continued as its random control, whose
        # rounds up to the first check are identical (benchmarks/vp.py shares that prefix)
        self.stopped = self._stopped()
