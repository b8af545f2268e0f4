"""Noise measurements for ``zo_step.py``: generator throughput, MeZO's reference step, server replay, and
the dense step with Philox Rademacher noise added in one fused compiled pass (``noise_fused.py``).

Imported by ``zo_step.py`` (same process, same model and batch); not a script of its own.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from meerkat_fl import noise_fused
from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource
from meerkat_fl.zo import replay

REPLAY_STEPS = 10  # a dense path the server replays (T = 10 local steps)
SOURCES = {
    "torch_cpu/gaussian": NoiseSource("torch_cpu", "gaussian"),
    "torch_cpu/rademacher": NoiseSource("torch_cpu", "rademacher"),
    "philox/gaussian": NoiseSource("philox", "gaussian"),
    "philox/rademacher": NoiseSource("philox", "rademacher"),
}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def noise_throughput(size: int = 1 << 22, threads: tuple[int, ...] = (1, 2), reps: int = 3) -> dict[str, dict]:
    """Values per second of ``segment`` (one tensor of ``size`` values) per source and torch thread count."""
    before = torch.get_num_threads()
    out: dict[str, dict] = {}
    try:
        for name, source in SOURCES.items():
            out[name] = {}
            for count in threads:
                torch.set_num_threads(count)
                source.segment(1, 0, 1 << 16)  # warm-up
                best = statistics.median(_seconds(lambda s=source: s.segment(7, 0, size)) for _ in range(reps))
                out[name][str(count)] = size / best
        # the fused pass adds z instead of returning it: values + c * z into a preallocated tensor, compiled
        values, target = torch.zeros(size), torch.zeros(size)
        out["philox/rademacher fused add"] = {}
        for count in threads:
            torch.set_num_threads(count)
            noise_fused.add_rademacher(target, values, 1, 1e-3)  # warm-up (and compile, once per thread count)
            best = statistics.median(
                _seconds(lambda: noise_fused.add_rademacher(target, values, 7, 1e-3)) for _ in range(reps))
            out["philox/rademacher fused add"][str(count)] = size / best
    finally:
        torch.set_num_threads(before)
    return out


class MeZOReference:
    """MeZO's reference dense step (princeton-nlp/MeZO, ``trainer.py``), reproduced faithfully on our model:
    ``zo_perturb_parameters`` re-seeds the global RNG and draws ``torch.normal`` per parameter in place
    (``param.data = param.data + scale * z * eps``) for +eps, -2eps and +eps (restore by arithmetic), then
    ``zo_update`` re-seeds and draws again for ``param.data -= lr * projected_grad * z``: four draws."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[], float], eps: float, lr: float) -> None:
        # MeZO's full-parameter runs perturb every parameter (ours are frozen for autograd: requires_grad=False)
        self.params = list(model.parameters())
        self.loss_fn, self.eps, self.lr, self.seed = loss_fn, eps, lr, 0

    @torch.no_grad()
    def _perturb(self, scale: float) -> None:
        torch.manual_seed(self.seed)  # MeZO's global RNG: benchmark only, never library code
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scale * z * self.eps

    @torch.no_grad()
    def step(self) -> None:
        self.seed += 1
        self._perturb(1.0)
        loss_plus = self.loss_fn()
        self._perturb(-2.0)
        loss_minus = self.loss_fn()
        self._perturb(1.0)
        projected_grad = (loss_plus - loss_minus) / (2 * self.eps)
        torch.manual_seed(self.seed)
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data - self.lr * projected_grad * z


def replay_seconds(values: torch.Tensor, mask: Mask, source: NoiseSource, steps: int, lr: float) -> float:
    """Seconds the server takes to replay a ``steps``-step (seed, scalar) path over ``mask``."""
    path = [(1000 + i, 0.5 - i / steps) for i in range(steps)]
    return _seconds(lambda: replay(values, mask, path, lr, noise=source))


def fused_phase(work, reps: int, warmup: int, *, paired: Callable, lr: float) -> dict:
    """The dense step with ``philox/rademacher`` (fused where a tensor has FUSE_MIN values or more) paired
    with two forwards; the first step, which compiles the kernels, is timed apart and kept out of the ratio;
    then the server's replay of a dense 10-step path with the same noise, over one forward."""
    params, values = work.bind("dense", SOURCES["philox/rademacher"])
    first_step_s = _seconds(lambda: work.step(params, values))  # compiles (inductor caches on disk)
    forward_s, step_s, ratios = paired(work.two_forward, lambda: work.step(params, values), reps, warmup)
    one_forward = statistics.median(_seconds(work.loss_fn) for _ in range(3))
    replay_s = replay_seconds(values, params.mask, params.noise, REPLAY_STEPS, lr)
    return {
        "dense_fused_step_s": statistics.median(step_s),
        "dense_fused_over_two_forward": statistics.median(ratios),
        "dense_fused_first_step_s": first_step_s,
        "dense_fused_compile_s": first_step_s - statistics.median(step_s),  # about: the first step less a step
        "dense_fused_compiled": noise_fused.compile_failed() is None,  # False: the eager fallback was timed
        "dense_fused_tensors": sum(params.noise.fuses(n) for n in params.mask.sizes),
        "dense_tensors": len(params.mask.sizes),
        "dense_fused_replay_over_one_forward": replay_s / one_forward,
        "dense_fused_samples": {"two_forward_s": forward_s, "step_s": step_s, "ratios": ratios},
    }


def noise_phases(work, sparse, dense, reps: int, warmup: int, *, paired: Callable, eps: float, lr: float) -> dict:
    """The noise generators' phases (issue 18), paired with two forwards like the others: sparse at 8 x 33
    tokens, sparse and dense with Philox, MeZO's reference dense step, server replay, raw throughput."""
    slow = max(1, reps // 4)  # a dense Philox step costs a minute or more on a shared 2-core CPU
    out: dict = {}
    long_loss = work.loss_fn
    work.loss_fn = work.short_loss_fn  # the same model, an 8 x 33 batch
    try:
        _, _, ratios = paired(work.two_forward, lambda: work.step(*sparse), reps, warmup)
        out["sparse_short_over_two_forward"] = statistics.median(ratios)
    finally:
        work.loss_fn = long_loss
    philox_sparse = work.bind("sparse", SOURCES["philox/gaussian"])
    _, _, ratios = paired(work.two_forward, lambda: work.step(*philox_sparse), reps, warmup)
    out["sparse_philox_over_two_forward"] = statistics.median(ratios)
    out.update(fused_phase(work, reps, warmup, paired=paired, lr=lr))
    dense_steps = {"philox/rademacher": {"step_s": out["dense_fused_step_s"],
                                         "over_two_forward": out["dense_fused_over_two_forward"]}}
    for name in ("philox/gaussian", "torch_cpu/rademacher"):
        bound = work.bind("dense", SOURCES[name])
        forward_s, step_s, ratios = paired(work.two_forward, lambda b=bound: work.step(*b), slow, 0)
        dense_steps[name] = {"step_s": statistics.median(step_s), "over_two_forward": statistics.median(ratios),
                             "ratios": ratios, "two_forward_s": forward_s}
    out["dense_by_noise"] = dense_steps
    out["dense_philox_over_two_forward"] = dense_steps["philox/gaussian"]["over_two_forward"]
    mezo = MeZOReference(work.model, work.loss_fn, eps, lr)
    forward_s, step_s, ratios = paired(work.two_forward, mezo.step, slow, 1)
    dense[0].write(dense[1])  # undo the reference step's drift (it restores by arithmetic)
    out["mezo_reference_step_s"] = statistics.median(step_s)
    out["mezo_reference_over_two_forward"] = statistics.median(ratios)
    one_forward = statistics.median(_seconds(work.loss_fn) for _ in range(3))
    replay_ratio: dict[str, dict] = {}
    for name, steps in (("torch_cpu/gaussian", REPLAY_STEPS), ("philox/gaussian", 1)):
        elapsed = replay_seconds(dense[1], dense[0].mask, SOURCES[name], steps, lr)
        replay_ratio[name] = {"steps_timed": steps, "seconds_per_step": elapsed / steps,
                              f"{REPLAY_STEPS}_step_path_over_one_forward": REPLAY_STEPS * elapsed / steps / one_forward}
    out["one_forward_s"], out["dense_replay"] = one_forward, replay_ratio
    out["noise_values_per_s"] = noise_throughput()
    return out


def noise_rows(r: dict) -> list[tuple[str, str, str]]:
    """The table rows of ``noise_phases`` (step ratios over two forwards; replay over one forward)."""
    rows = [("sparse step, 8 x 33 tokens", "", f"{r['sparse_short_over_two_forward']:.3f}"),
            ("sparse step, philox/gaussian", "", f"{r['sparse_philox_over_two_forward']:.3f}")]
    rows += fused_rows(r)  # dense_by_noise's philox/rademacher entry is this phase
    for name, d in r["dense_by_noise"].items():
        if name != "philox/rademacher":
            rows.append((f"dense step, {name}", f"{d['step_s']:.3f} s", f"{d['over_two_forward']:.3f}"))
    rows.append(("dense step, MeZO reference (4 draws)", f"{r['mezo_reference_step_s']:.3f} s",
                 f"{r['mezo_reference_over_two_forward']:.3f}"))
    for name, d in r["dense_replay"].items():
        rows.append((f"replay {REPLAY_STEPS} dense steps, {name}", f"{d['seconds_per_step'] * REPLAY_STEPS:.2f} s",
                     f"{d[f'{REPLAY_STEPS}_step_path_over_one_forward']:.1f} fwd"))
    return rows


def fused_rows(r: dict) -> list[tuple[str, str, str]]:
    """The table rows of ``fused_phase``."""
    how = "fused" if r["dense_fused_compiled"] else "EAGER FALLBACK"
    return [(f"dense step, philox/rademacher, {how}", f"{r['dense_fused_step_s']:.3f} s",
             f"{r['dense_fused_over_two_forward']:.3f}"),
            (f"  tensors fused: {r['dense_fused_tensors']} of {r['dense_tensors']}", "", ""),
            ("  its first step (compiles)", f"{r['dense_fused_first_step_s']:.2f} s", ""),
            (f"  replay {REPLAY_STEPS} dense steps, fused", "", f"{r['dense_fused_replay_over_one_forward']:.1f} fwd")]
