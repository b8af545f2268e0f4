"""How much one accepted reply can move the global model: bounded by what the round's other clients do.

A reply carries T scalars g_t for the seeds the server issued; the client's update is
-lr * sum_t g_t z_t, and the z_t of one client are independent Gaussians over the masked values, so its
norm is lr * ||g||_2 * sqrt(masked values), up to noise (``method.md`` section 2). The server chooses the
seeds, the lr and the weight p_k (from the data sizes it holds, not from anything a client reports), so
the scalars are the client's only lever, and bounding them bounds its influence. Rules (``fed.clip``):

- ``norm`` (default): each client's scalar vector is scaled down, if needed, to root-mean-square
  ||g||_2 / sqrt(len g) <= factor x the lower median of the round's accepted clients' root-mean-squares, i.e.
  to norm <= that bound x sqrt(its own step count). Scaling keeps the client's direction (an honest client
  clipped on a noisy round still descends); the bound follows the honest majority as gradients shrink. Per
  step, not per vector: an honest client's norm grows as the square root of its step count, and clients of one
  round may take different counts (Meerkat-vp's stopped clients take 1 step while the rest take T); a bound on
  whole-vector norms held the clients still taking T steps to a few one-step norms and scaled them down.
- ``scalar``: each scalar is clipped to |g| <= factor x the lower median of all the round's |g|.
- ``none``: only the absolute cap (``fed.max_abs_scalar``, a reply above it is rejected whole).

The lower median (the smaller middle value) keeps the bound honest as long as honest replies are at least
half the round: with two clients it is the smaller one, so one attacker of two is held to factor x the
honest client. The statistic is the round's own, not a running history: it needs no state in checkpoints
and cannot be ratcheted up over rounds. The clipped scalars are what the server aggregates AND what the
"scalars" downlink sends to clients, so replay stays exact by construction.

Not defended here (see README): a hostile majority of a round; an attacker that sends scalars up to the
bound in the wrong direction (sign flips): it cannot be told apart from an honest client on a hard batch
without the client's data, so its damage is bounded (at most factor x a typical client's step, weighted
by p_k), not removed; and coordinate-wise robust aggregation (median / trimmed mean of updates), which
would cancel most of the signal: each client's update lies along its own random directions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CLIP_RULES = ("none", "norm", "scalar")


def lower_median(values: np.ndarray) -> float:
    """The smaller middle value (float64): never an average that one extreme value can pull up."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    return float(ordered[(ordered.size - 1) // 2])


def _rms(scalars: np.ndarray) -> float:
    """||g||_2 / sqrt(len g) in float64: a client's typical scalar, whatever its step count (len g >= 1)."""
    values = np.asarray(scalars, dtype=np.float64)
    return float(np.linalg.norm(values) / np.sqrt(values.size))


@dataclass(frozen=True)
class ScalarClip:
    """The per-round bound on accepted clients' scalars (pure: the same inputs give the same bits)."""

    rule: str = "norm"
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.rule not in CLIP_RULES:
            raise ValueError(f"clip rule must be one of {', '.join(CLIP_RULES)}, got {self.rule!r}")
        if not (np.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"clip factor must be finite and > 0, got {self.factor!r}")

    def bound(self, scalars: Mapping[int, np.ndarray]) -> float | None:
        """The round's bound: on each client's root-mean-square scalar ("norm") or on each |g_t| ("scalar");
        None if none."""
        if self.rule == "none" or not scalars:
            return None
        if self.rule == "norm":
            return self.factor * lower_median(np.array([_rms(s) for s in scalars.values()]))
        every = np.concatenate([np.abs(s.astype(np.float64)) for s in scalars.values()])
        return self.factor * lower_median(every) if every.size else None

    def apply(self, scalars: Mapping[int, np.ndarray]) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
        """({client: float32 scalars within the bound}, the round's metrics: the bound and, per client, how
        many scalars were changed). Scalars within the bound are returned bit for bit."""
        bound = self.bound(scalars)
        out, clipped = {}, {}
        for cid in sorted(scalars):
            values = np.asarray(scalars[cid], dtype=np.float32)
            if bound is None:
                kept = values
            elif self.rule == "norm":
                rms = _rms(values)
                # float32 arithmetic on the sender's side only: the result travels, nobody recomputes it
                kept = values * np.float32(bound / rms) if rms > bound else values
            else:
                limit = np.float32(bound)
                kept = np.clip(values, -limit, limit)
            out[cid] = kept
            clipped[cid] = int(np.count_nonzero(kept != values))
        metrics = {"clip_bound": bound, "clipped_by_client": {str(k): v for k, v in clipped.items()}}
        return out, metrics
