"""Cost of one zeroth-order step against inference: SmolLM2-135M, float32 CPU, batch 8 x 64 tokens.

(Over the house's ~400 lines on purpose: every phase must be timed in one process against the same forward
baseline, so the phases stay in one script; the noise phases' helpers live in zo_noise.py.)

A full step is ``zo_step`` (perturb +eps, loss, perturb -eps, loss, restore by copy) followed by
``apply_step`` (z again, update the master values), exactly what ``local_train`` runs, with the library's
``zo.noise_cache=auto`` (z drawn once per step for the sparse mask, three times for dense); a third phase
times dense with ``zo.noise_cache=on`` (z drawn once, one model-sized buffer more: see its peak RSS). The baseline is two
plain forward passes of the same loss. Ratios are medians of per-repetition ratios of adjacent runs (ABBA
order) in this one process; an A/A control (two forwards against themselves) gives the noise floor, and the
step's overhead is also timed part by part, which is far more precise than a difference of two ~1.5 s runs.

The label scorer is timed against a plain forward (full-vocabulary logits at every position), paired the
same way: the scorer before issue 13 (final hidden state @ the label words' lm_head rows, by hand) and the
current one (the model's own forward with ``logits_to_keep`` at the answer position, then the label
columns). ``--only-scorers`` runs just that comparison (a minute) and writes benchmarks/results/scorer_cost.json.
The ``philox/rademacher`` dense step adds its noise in one fused compiled pass per tensor (``noise_fused.py``);
its first step, which compiles, is timed apart and kept out of its ratio.
``--only-dense`` runs the dense steps only (two forwards, the default dense step, the fused Philox Rademacher
step and its replay; a few minutes) and writes benchmarks/results/zo_step_dense.json.

Peak memory is measured in a fresh child process per workload (the script re-invokes itself). The lifetime
peak (``ru_maxrss``) is set by model loading (~2x the steady RSS), not by the workload, so after load and a
warm-up forward the child resets the kernel's high-water mark (``/proc/self/clear_refs``) and reports the peak
RSS while the workload runs, and its increase over the RSS before it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/zo_step.py --json benchmarks/results/zo_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from zo_noise import fused_phase, fused_rows, noise_phases, noise_rows

from meerkat_fl import memory
from meerkat_fl.errors import MeerkatError
from meerkat_fl.masks import Mask, build_mask, load_mask, save_mask
from meerkat_fl.models import load_model
from meerkat_fl.noise import LEGACY, NoiseSource
from meerkat_fl.tasks import Batch, encode, get_task, label_logits, label_token_ids
from meerkat_fl.zo import MaskedParams, apply_step, segment_noise, wants_noise_cache, zo_step

MODEL = "smollm2"
BATCH_SIZE, SEQ_LEN = 8, 64
SHORT_LEN = 33  # the second shape: a short SST-2 batch, where per-tensor writes weigh more
DENSITY = 1e-3
EPS = 1e-3
LR = 1e-7  # tiny, so the repeated steps leave the weights (and so the forward cost) where they were
PEAK_REPEATS = 3  # workload repetitions in each peak-memory child
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path(os.environ.get("MEERKAT_DATA_DIR", REPO.parent / "shared" / "data"))
PEAK_WORKLOADS = {
    "inference": "inference_peak", "sparse": "sparse_step_peak", "dense": "dense_step_peak",
    "dense_cached": "dense_cached_step_peak",
}
GOALS = {"sparse_over_two_forward": 1.05, "sparse_short_over_two_forward": 1.05,
         "sparse_step_peak_over_inference": 1.10, "dense_philox_over_two_forward": 1.5,
         "dense_fused_over_two_forward": 1.5}


def fixed_batch(tokenizer, data_dir: Path, seq_len: int = SEQ_LEN) -> tuple[Batch, str]:
    """8 rows of exactly 64 real tokens, each ending with its own SST-2 prompt (the answer cue stays last).

    A row is filled on the left with the prompts of other examples, as few-shot context would be, so no row
    is padded and the forward cost is that of 8 x 64 tokens. Random token ids if SST-2 is not available.
    """
    try:
        data = get_task("sst2").load("train", data_dir=data_dir).subset(range(8 * BATCH_SIZE))
    except MeerkatError:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, len(tokenizer), (BATCH_SIZE, seq_len), generator=generator)
        labels = torch.arange(BATCH_SIZE) % 2
        return _batch(ids, labels, label_token_ids(tokenizer, get_task("sst2").label_words)), "random token ids"
    encoded = encode(tokenizer, data, get_task("sst2").label_words, max_length=seq_len)
    filler = [t for ids in encoded.token_ids[BATCH_SIZE:] for t in ids]
    rows = []
    for row in range(BATCH_SIZE):
        context = filler[row * seq_len : (row + 1) * seq_len]
        rows.append((context + encoded.token_ids[row])[-seq_len:])
    labels = torch.from_numpy(encoded.labels[:BATCH_SIZE].copy())
    return _batch(torch.tensor(rows, dtype=torch.int64), labels, encoded.label_token_ids), "sst2 train prompts, left-filled"


def _batch(input_ids: torch.Tensor, labels: torch.Tensor, answer_ids) -> Batch:
    attention_mask = torch.ones_like(input_ids)
    last_index = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.int64)
    return Batch(input_ids, attention_mask, last_index, labels, torch.tensor(list(answer_ids), dtype=torch.int64))


@torch.no_grad()
def hand_label_logits(model, batch: Batch) -> torch.Tensor:
    """The scorer before issue 13, kept here to time it: final hidden state @ the label words' head rows.

    Wrong for models whose logits are not a plain projection (Gemma-2 soft-caps them); see tasks/base.py.
    """
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    answer = hidden[torch.arange(hidden.shape[0]), batch.last_index].float()
    head = model.get_output_embeddings()
    return answer @ head.weight[batch.label_token_ids].float().T


class Workloads:
    """The three timed workloads on one loaded model: two forwards, a sparse step, a dense step."""

    def __init__(self, data_dir: Path, sparse_mask_path: Path | None = None) -> None:
        loaded = load_model(MODEL)
        self.model, self.fingerprint = loaded.model, loaded.fingerprint
        self.batch, self.batch_source = fixed_batch(loaded.tokenizer, data_dir)
        task = get_task("sst2")
        self.loss_fn = lambda: task.loss(self.model, self.batch)
        self.short_batch, _ = fixed_batch(loaded.tokenizer, data_dir, SHORT_LEN)
        self.short_loss_fn = lambda: task.loss(self.model, self.short_batch)
        self.sparse_mask_path = sparse_mask_path
        self.seed = 0

    def bind(self, kind: str, noise: NoiseSource = LEGACY) -> tuple[MaskedParams, torch.Tensor]:
        """MaskedParams and master values for "sparse" (random mask, density 1e-3 of linear), "dense", or
        "dense_cached" (dense with zo.noise_cache=on); the others use the library default (auto)."""
        if kind in ("dense", "dense_cached"):
            mask = build_mask(self.model, "dense", 1.0, fingerprint=self.fingerprint, scope="all")
        elif self.sparse_mask_path is not None:  # a child process: read the parent's mask, as finetune does
            mask = load_mask(self.sparse_mask_path, self.fingerprint)
        else:
            mask = build_mask(self.model, "random", DENSITY, fingerprint=self.fingerprint, scope="linear")
        params = MaskedParams(self.model, mask, cache_noise=wants_noise_cache(
            "on" if kind == "dense_cached" else "auto", mask), noise=noise)
        return params, params.gather()

    def two_forward(self) -> None:
        self.loss_fn()
        self.loss_fn()

    def step(self, params: MaskedParams, values: torch.Tensor) -> None:
        self.seed += 1
        result = zo_step(self.loss_fn, params, values, self.seed, EPS)
        apply_step(values, params.mask, self.seed, result.scalar, LR, noise=params.noise,
                   noise_fn=params.segment_noise)
        params.forget_noise()


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead_parts(params: MaskedParams, values: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of the non-forward parts of one step, and what they add up to.

    A step generates z three times (two perturbed writes, one apply) and writes the model three times.
    """
    mask, seed = params.mask, 12345

    def all_noise() -> None:
        for position, size in enumerate(mask.sizes):
            params.noise.segment(seed, position, size)

    parts = {
        "noise_s": lambda: all_noise(),
        "write_perturbed_s": lambda: params.write(values, seed=seed, scale=EPS),
        "write_restore_s": lambda: params.write(values),
        "apply_s": lambda: apply_step(values, mask, seed, 1.0, LR, noise=params.noise),  # moves values ~1e-7
    }
    out = {name: statistics.median(seconds(fn) for _ in range(reps)) for name, fn in parts.items()}
    params.write(values)
    out["step_overhead_from_parts_s"] = 2 * out["write_perturbed_s"] + out["write_restore_s"] + out["apply_s"]
    out["noise_total_s"] = 3 * out["noise_s"]
    out["write_copy_total_s"] = 2 * (out["write_perturbed_s"] - out["noise_s"]) + out["write_restore_s"]
    out["apply_add_s"] = out["apply_s"] - out["noise_s"]
    return out


def paired(
    first: Callable[[], object], second: Callable[[], object], reps: int, warmup: int
) -> tuple[list[float], list[float], list[float]]:
    """Seconds of ``first`` and ``second`` run side by side (ABBA order), and their per-repetition ratios.

    A ratio of two adjacent runs cancels the slow drift of a shared 2-core machine that a ratio of medians
    taken minutes apart would not.
    """
    times_a, times_b = [], []
    for rep in range(warmup + reps):
        if rep % 2 == 0:
            elapsed_a, elapsed_b = seconds(first), seconds(second)
        else:
            elapsed_b, elapsed_a = seconds(second), seconds(first)
        if rep >= warmup:
            times_a.append(elapsed_a)
            times_b.append(elapsed_b)
    return times_a, times_b, [b / a for a, b in zip(times_a, times_b)]


def time_scorers(work: Workloads, reps: int, warmup: int) -> dict:
    """Old (by hand) and current (logits_to_keep) label scorer, each paired with a plain full-logits forward."""
    model, batch = work.model, work.batch

    @torch.no_grad()
    def plain() -> None:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    with torch.no_grad():
        same = torch.allclose(hand_label_logits(model, batch), label_logits(model, batch), rtol=1e-4, atol=1e-4)
    _, old_s, old_ratios = paired(plain, lambda: hand_label_logits(model, batch), reps, warmup)
    plain_s, new_s, new_ratios = paired(plain, lambda: torch.no_grad()(label_logits)(model, batch), reps, warmup)
    _, _, new_over_old = paired(lambda: hand_label_logits(model, batch),
                                lambda: torch.no_grad()(label_logits)(model, batch), reps, warmup)
    return {
        "plain_forward_s": statistics.median(plain_s),
        "scorer_by_hand_s": statistics.median(old_s),
        "scorer_logits_to_keep_s": statistics.median(new_s),
        "scorer_by_hand_over_plain_forward": statistics.median(old_ratios),
        "scorer_logits_to_keep_over_plain_forward": statistics.median(new_ratios),
        "scorer_logits_to_keep_over_by_hand": statistics.median(new_over_old),
        "scorers_agree": same,
        "scorer_samples": {"by_hand": old_ratios, "logits_to_keep": new_ratios, "new_over_old": new_over_old},
    }


def print_scorers(r: dict) -> None:
    print(f"label scorer, SmolLM2-135M float32 CPU, batch {BATCH_SIZE}x{SEQ_LEN}, medians of paired ratios")
    print(f"{'':44} {'seconds':>9} {'x plain':>8}")
    print(f"{'plain forward (full logits, every position)':44} {r['plain_forward_s']:>9.3f} {1:>8.3f}")
    print(f"{'scorer by hand (hidden @ lm_head rows)':44} {r['scorer_by_hand_s']:>9.3f} "
          f"{r['scorer_by_hand_over_plain_forward']:>8.3f}")
    print(f"{'scorer via forward, logits_to_keep':44} {r['scorer_logits_to_keep_s']:>9.3f} "
          f"{r['scorer_logits_to_keep_over_plain_forward']:>8.3f}")
    print(f"current / by hand (paired): {r['scorer_logits_to_keep_over_by_hand']:.3f}; "
          f"same label logits: {r['scorers_agree']}")


def time_steps(data_dir: Path, reps: int, warmup: int) -> tuple[dict, Mask]:
    """Paired phases: two forwards vs themselves (noise floor), vs a sparse step, vs a dense step; parts."""
    work = Workloads(data_dir)
    sparse, dense = work.bind("sparse"), work.bind("dense")
    _, _, control_ratios = paired(work.two_forward, work.two_forward, reps, warmup)  # the noise floor
    forward_s, sparse_s, sparse_ratios = paired(work.two_forward, lambda: work.step(*sparse), reps, warmup)
    forward_d, dense_s, dense_ratios = paired(work.two_forward, lambda: work.step(*dense), reps, warmup)
    cached = work.bind("dense_cached")
    forward_c, cached_s, cached_ratios = paired(work.two_forward, lambda: work.step(*cached), reps, warmup)
    result: dict = {
        "two_forward_s": statistics.median(forward_s),
        "sparse_step_s": statistics.median(sparse_s),
        "dense_step_s": statistics.median(dense_s),
        "sparse_over_two_forward": statistics.median(sparse_ratios),
        "dense_over_two_forward": statistics.median(dense_ratios),
        "dense_cached_step_s": statistics.median(cached_s),
        "dense_cached_over_two_forward": statistics.median(cached_ratios),
        "sparse_ratio_quartiles": statistics.quantiles(sparse_ratios, n=4),
        "control_two_forward_ratio": statistics.median(control_ratios),  # A/A: 1 up to noise
        "control_ratio_quartiles": statistics.quantiles(control_ratios, n=4),
        "samples": {
            "control_phase": {"ratios": control_ratios},
            "sparse_phase": {"two_forward_s": forward_s, "sparse_step_s": sparse_s, "ratios": sparse_ratios},
            "dense_phase": {"two_forward_s": forward_d, "dense_step_s": dense_s, "ratios": dense_ratios},
            "dense_cached_phase": {"two_forward_s": forward_c, "step_s": cached_s, "ratios": cached_ratios},
        },
    }
    result["sparse_overhead_s"] = result["sparse_step_s"] - result["two_forward_s"]
    result["dense_overhead_s"] = result["dense_step_s"] - statistics.median(forward_d)
    result["sparse_parts"] = overhead_parts(*sparse, reps=max(20, reps))
    result["dense_parts"] = overhead_parts(*dense, reps=reps)
    result["sparse_parts_prototype"] = prototype_parts(*sparse, reps=max(20, reps))
    for parts in ("sparse_parts", "sparse_parts_prototype"):
        overhead = result[parts]["step_overhead_from_parts_s"]
        result[f"{parts}_over_two_forward"] = 1 + overhead / result["two_forward_s"]
    result["sparse_masked_values"], result["dense_masked_values"] = sparse[0].size, dense[0].size
    result["batch_source"] = work.batch_source
    result.update(time_scorers(work, reps, warmup))
    result.update(noise_phases(work, sparse, dense, reps, warmup, paired=paired, eps=EPS, lr=LR))
    return result, sparse[0].mask


class CachedNoiseWriter:
    """PROTOTYPE of a faster sparse write, not library code: what ``zo.MaskedParams.write`` could do.

    z over the whole mask is drawn once per step (425 kB at density 1e-3) and reused by the +eps write, the
    -eps write and the update, instead of being regenerated three times; ``values + scale * z`` is two flat
    ops instead of two per tensor; each tensor then gets one ``index_copy_`` into a flat view bound once.
    """

    def __init__(self, params: MaskedParams) -> None:
        self.sizes = params.mask.sizes
        self.targets = [tensor.view(-1) for tensor in params.tensors]
        self.indices = params.indices

    def noise(self, seed: int) -> torch.Tensor:
        return torch.cat([segment_noise(seed, i, size) for i, size in enumerate(self.sizes)])

    @torch.no_grad()
    def write(self, values: torch.Tensor, noise: torch.Tensor | None = None, scale: float = 0.0) -> None:
        flat = values if noise is None else values + scale * noise  # same two ops as the library: same bits
        for target, index, segment in zip(self.targets, self.indices, flat.split(self.sizes)):
            if index is None:
                target.copy_(segment)
            else:
                target.index_copy_(0, index, segment.to(target.dtype))


def prototype_parts(params: MaskedParams, values: torch.Tensor, reps: int) -> dict[str, float | bool]:
    """Overhead parts of a step with CachedNoiseWriter, and whether it writes the library's exact bits."""
    writer, seed, scalar = CachedNoiseWriter(params), 12345, 0.75
    z = writer.noise(seed)
    params.write(values, seed=seed, scale=-EPS)
    expected_write = params.gather()
    writer.write(values, z, -EPS)
    expected_apply = apply_step(values.clone(), params.mask, seed, scalar, LR, noise=LEGACY)
    same_bits = torch.equal(params.gather(), expected_write) and torch.equal(
        values.clone().add_(z, alpha=-LR * scalar), expected_apply
    )
    parts = {
        "noise_s": lambda: writer.noise(seed),
        "write_perturbed_s": lambda: writer.write(values, z, EPS),
        "write_restore_s": lambda: writer.write(values),
        "apply_s": lambda: values.add_(z, alpha=-LR * scalar),
    }
    out: dict[str, float | bool] = {
        name: statistics.median(seconds(fn) for _ in range(reps)) for name, fn in parts.items()
    }
    params.write(values)
    out["step_overhead_from_parts_s"] = (
        out["noise_s"] + 2 * out["write_perturbed_s"] + out["write_restore_s"] + out["apply_s"]
    )
    out["same_bits_as_library"] = same_bits
    return out


# ---- peak memory, in a fresh child process per workload -------------------------------------------------


def measure_peak(kind: str, data_dir: Path, mask_path: Path | None) -> dict[str, float | bool]:
    """Child: load + warm up (one forward), then run the workload; peak RSS overall and over the setup RSS."""
    work = Workloads(data_dir, mask_path)
    work.loss_fn()  # warm-up forward: lazy allocations belong to the setup, not to the workload
    setup_rss = memory.rss_mb()
    setup_maxrss = memory.lifetime_peak_mb()
    reset = memory.reset_peak()
    if kind == "inference":
        for _ in range(PEAK_REPEATS):
            work.two_forward()
    else:
        params, values = work.bind(kind)  # the master copy is part of what training holds
        for _ in range(PEAK_REPEATS):
            work.step(params, values)
    maxrss = memory.lifetime_peak_mb()
    workload_peak = memory.peak_mb() if reset else maxrss
    return {
        "ru_maxrss_mb": maxrss,  # lifetime peak, model loading included
        "setup_ru_maxrss_mb": setup_maxrss,
        "setup_rss_mb": setup_rss,
        "workload_peak_mb": workload_peak,  # peak RSS while the workload ran (model included)
        "increase_mb": workload_peak - setup_rss,
        "peak_was_reset": reset,
    }


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_load() -> dict[str, float]:
    """Child: seconds of the first load_model call in a fresh process (imports done first), and of a second."""
    start = time.perf_counter()
    import transformers  # noqa: F401  (imported up front so the load time is the load only)

    import_s = time.perf_counter() - start
    first = seconds(lambda: load_model(MODEL))
    return {"import_s": import_s, "load_s": first, "reload_s": seconds(lambda: load_model(MODEL))}


# ---- the benchmark ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "zo_step.json")
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--skip-cold-load", action="store_true", help="skip the ~25 s GGUF conversion")
    parser.add_argument("--only-scorers", action="store_true",
                        help="only time the label scorers (writes benchmarks/results/scorer_cost.json)")
    parser.add_argument("--only-dense", action="store_true",
                        help="only the dense steps (writes benchmarks/results/zo_step_dense.json)")
    parser.add_argument("--skip-load", action="store_true", help="skip the load timings (warm and cold)")
    parser.add_argument("--measure-peak", choices=list(PEAK_WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--measure-load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mask", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_peak:
        print(json.dumps(measure_peak(args.measure_peak, args.data_dir, args.mask)))
        return
    if args.measure_load:
        print(json.dumps(measure_load()))
        return
    if args.only_scorers:
        work = Workloads(args.data_dir)
        result = {**time_scorers(work, args.reps, args.warmup), "batch_source": work.batch_source,
                  "threads": torch.get_num_threads(), "reps": args.reps, "torch_version": torch.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        print_scorers(result)
        out = REPO / "benchmarks" / "results" / "scorer_cost.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return

    if args.only_dense:
        dense_only(args)
        return
    result, sparse_mask = time_steps(args.data_dir, args.reps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--data-dir", str(args.data_dir), "--mask", str(save_mask(sparse_mask, Path(tmp) / "m.st"))]
        peaks = {kind: run_child(["--measure-peak", kind, *common]) for kind in PEAK_WORKLOADS}
    for kind, name in PEAK_WORKLOADS.items():
        result[f"{name}_mb"] = peaks[kind]["workload_peak_mb"]
        result[f"{name}_increase_mb"] = peaks[kind]["increase_mb"]
        result[f"{name}_ru_maxrss_mb"] = peaks[kind]["ru_maxrss_mb"]
    result["peak_children"] = peaks
    result["sparse_step_peak_over_inference"] = result["sparse_step_peak_mb"] / result["inference_peak_mb"]
    result["dense_step_peak_over_inference"] = result["dense_step_peak_mb"] / result["inference_peak_mb"]
    result["dense_cached_over_dense_step_time"] = result["dense_cached_step_s"] / result["dense_step_s"]

    if not args.skip_load:
        warm = [run_child(["--measure-load"]) for _ in range(3)]
        result["warm_load_s"] = statistics.median(w["load_s"] for w in warm)
        result["warm_reload_in_process_s"] = statistics.median(w["reload_s"] for w in warm)
        result["import_transformers_s"] = statistics.median(w["import_s"] for w in warm)
        if not args.skip_cold_load:
            with tempfile.TemporaryDirectory() as cache:
                cold = run_child(["--measure-load"], env={**os.environ, "MEERKAT_CACHE": cache})
            result["cold_load_s"] = cold["load_s"]
    result["goals"] = {
        key: {"goal": goal, "value": result[key], "met": result[key] <= goal} for key, goal in GOALS.items()
    }
    result.update(
        model=MODEL,
        batch=f"{BATCH_SIZE}x{SEQ_LEN}",
        density=DENSITY,
        eps=EPS,
        dtype="float32",
        device="cpu",
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        reps=args.reps,
        warmup=args.warmup,
        machine={
            "processor": platform.processor() or cpu_model(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    print_table(result)
    print_scorers(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


def dense_only(args: argparse.Namespace) -> None:
    """Two forwards against themselves, the default dense step (torch_cpu Gaussian, drawn 3 times) and the
    fused Philox Rademacher step, each paired with two forwards in this one process."""
    work = Workloads(args.data_dir)
    dense = work.bind("dense")
    _, _, control = paired(work.two_forward, work.two_forward, args.reps, args.warmup)
    forward_s, dense_s, ratios = paired(work.two_forward, lambda: work.step(*dense), args.reps, args.warmup)
    result = {"two_forward_s": statistics.median(forward_s), "control_two_forward_ratio": statistics.median(control),
              "dense_step_s": statistics.median(dense_s), "dense_over_two_forward": statistics.median(ratios),
              "dense_samples": {"two_forward_s": forward_s, "step_s": dense_s, "ratios": ratios, "control": control},
              **fused_phase(work, args.reps, args.warmup, paired=paired, lr=LR)}
    result["goals"] = {"dense_fused_over_two_forward": {
        "goal": GOALS["dense_fused_over_two_forward"], "value": result["dense_fused_over_two_forward"],
        "met": result["dense_fused_over_two_forward"] <= GOALS["dense_fused_over_two_forward"]}}
    result.update(model=MODEL, batch=f"{BATCH_SIZE}x{SEQ_LEN}", dtype="float32", threads=torch.get_num_threads(),
                  reps=args.reps, torch_version=torch.__version__, batch_source=work.batch_source,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"SmolLM2-135M dense steps, float32 CPU, batch {result['batch']}, {result['threads']} threads, "
          f"medians of {args.reps} paired ratios")
    rows = [("two forwards (inference)", f"{result['two_forward_s']:.3f} s", "1.000"),
            ("  A/A control", "", f"{result['control_two_forward_ratio']:.3f}"),
            ("dense step, torch_cpu/gaussian", f"{result['dense_step_s']:.3f} s",
             f"{result['dense_over_two_forward']:.3f}"),
            *fused_rows(result)]
    for label, value, extra in rows:
        print(f"{label:44} {value:>10} {extra:>12}")
    out = REPO / "benchmarks" / "results" / "zo_step_dense.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return ""
    return match.group(1).strip() if match else ""


def print_table(r: dict) -> None:
    sp, dp, pp = r["sparse_parts"], r["dense_parts"], r["sparse_parts_prototype"]
    ms = lambda x: f"{x * 1e3:.1f} ms"
    mb = lambda key: (f"{r[key + '_mb']:.0f} MB", f"+{r[key + '_increase_mb']:.0f} MB")
    rows = [
        ("two forwards (inference)", f"{r['two_forward_s']:.3f} s", "1.000"),
        ("sparse step, density 1e-3", f"{r['sparse_step_s']:.3f} s", f"{r['sparse_over_two_forward']:.3f}"),
        (
            "  overhead from parts",
            ms(sp["step_overhead_from_parts_s"]),
            f"{r['sparse_parts_over_two_forward']:.3f}",
        ),
        ("    noise, 3 draws (uncached)", ms(sp["noise_total_s"]), ""),
        ("    3 writes, noise excluded", ms(sp["write_copy_total_s"]), ""),
        ("    update add", ms(sp["apply_add_s"]), ""),
        (
            "  prototype: z once, index_copy_",
            ms(pp["step_overhead_from_parts_s"]),
            f"{r['sparse_parts_prototype_over_two_forward']:.3f}",
        ),
        ("dense step, all parameters", f"{r['dense_step_s']:.3f} s", f"{r['dense_over_two_forward']:.3f}"),
        ("    noise, 3 draws (uncached)", f"{dp['noise_total_s']:.3f} s", ""),
        ("    3 writes, noise excluded", f"{dp['write_copy_total_s']:.3f} s", ""),
        ("    update add", f"{dp['apply_add_s']:.3f} s", ""),
        ("dense step, zo.noise_cache=on", f"{r['dense_cached_step_s']:.3f} s",
         f"{r['dense_cached_over_two_forward']:.3f}"),
        ("peak RSS, inference", *mb("inference_peak")),
        ("peak RSS, sparse step", *mb("sparse_step_peak")),
        ("peak RSS, dense step", *mb("dense_step_peak")),
        ("peak RSS, dense step, noise cached", *mb("dense_cached_step_peak")),
        ("sparse peak / inference peak", f"{r['sparse_step_peak_over_inference']:.3f}", ""),
        ("lifetime peak (load), inference", f"{r['inference_peak_ru_maxrss_mb']:.0f} MB", ""),
    ]
    if "warm_load_s" in r:
        rows += [("warm load, fresh process", f"{r['warm_load_s']:.2f} s", ""),
                 ("warm load, again in-process", f"{r['warm_reload_in_process_s']:.2f} s", "")]
    if "cold_load_s" in r:
        rows.append(("cold load (GGUF conversion)", f"{r['cold_load_s']:.2f} s", ""))
    rows += noise_rows(r)
    print(f"SmolLM2-135M, float32 CPU, batch {r['batch']}, {r['threads']} threads, medians of {r['reps']}")
    print(f"{'':34} {'value':>10} {'ratio / +MB':>12}")
    for label, value, extra in rows:
        print(f"{label:34} {value:>10} {extra:>12}")
    print("noise values/s (M) by torch threads: " + ", ".join(
        f"{name} " + "/".join(f"{v / 1e6:.0f}" for v in by_threads.values())
        for name, by_threads in r["noise_values_per_s"].items()))
    for key, goal in r["goals"].items():
        print(f"goal {key} <= {goal['goal']}: {goal['value']:.3f} {'met' if goal['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
