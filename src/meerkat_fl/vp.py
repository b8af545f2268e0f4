"""GradIP and Meerkat-vp (method doc section 4): watch each client's virtual path, early-stop extreme clients.

GradIP of one replayed local step is ``g * <(grad f_p)_m, z>``: the inner product of the masked mean
pre-training gradient the mask stores with the step's ZO gradient estimate ``g * z``. The server already
holds every (seed, scalar) pair, so GradIP needs no forward pass: one regeneration of ``z`` from the seed
(segment by segment, exactly as ``zo.apply_step`` does) and one dot product, O(masked values) per step.

Detection works on a client's *trajectory*: its GradIP values in the order the client ran its steps,
concatenated over the rounds it took part in. Everything here is a pure function of arrays, so it is tested on
synthetic trajectories; the strategy that acts on it is ``fed/strategies/meerkat_vp.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.messages import ClientPath
from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource

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


def projection(mask: Mask, seed: int, *, noise: NoiseSource) -> tuple[float, float]:
    """(<(grad f_p)_m, z>, ||z||) for the noise ``z`` of ``seed``, accumulated segment by segment in float64."""
    grads = _require_pretrain_grad(mask)
    dot, z_squared, offset = 0.0, 0.0, 0
    flat = noise.draw(seed, mask.sizes) if 0 < mask.size <= noise.flat_limit else None  # philox: one call
    for position, (grad, size) in enumerate(zip(grads, mask.sizes)):
        # the very noise the client and the replay use
        z = flat[offset : offset + size] if flat is not None else noise.segment(seed, position, size)
        offset += size
        dot += float(torch.dot(grad, z).double())
        z_squared += float(torch.dot(z, z).double())
    return dot, math.sqrt(z_squared)


def pretrain_grad_norm(mask: Mask) -> float:
    """||(grad f_p)_m||_2 over the masked values."""
    return math.sqrt(sum(float(torch.dot(g, g).double()) for g in _require_pretrain_grad(mask)))


def path_gradip(
    mask: Mask, seeds: Sequence[int], scalars: Sequence[float], *, noise: NoiseSource, cosine: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed GradIP of every step of a path, float64 [T]; with ``cosine``, also cos(angle) between
    (grad f_p)_m and the ZO estimate g*z, in [-1, 1] (0 for a zero scalar) — for analysis only."""
    gradip = np.zeros(len(seeds), dtype=np.float64)
    cosines = np.zeros(len(seeds), dtype=np.float64) if cosine else None
    norm = pretrain_grad_norm(mask) if cosine else 0.0
    for step, (seed, scalar) in enumerate(zip(seeds, scalars, strict=True)):
        dot, z_norm = projection(mask, int(seed), noise=noise)
        gradip[step] = float(scalar) * dot
        if cosines is not None and scalar != 0.0 and norm > 0.0 and z_norm > 0.0:
            cosines[step] = math.copysign(1.0, float(scalar)) * dot / (norm * z_norm)
    return gradip, cosines


def gradip_records(
    round_number: int, mask: Mask, paths: Sequence[ClientPath], *, noise: NoiseSource, cosine: bool = False
) -> list[dict]:
    """The ``gradip.jsonl`` lines of one round: per accepted client, its steps' signed GradIP (|GradIP| is
    the absolute form) and optionally the cosine. ``round_number`` is 1-based, as in metrics.jsonl."""
    records = []
    for path in sorted(paths, key=lambda p: p.client_id):
        gradip, cosines = path_gradip(mask, path.seeds.tolist(), path.scalars.tolist(), noise=noise, cosine=cosine)
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
