"""The CUDA and reduced-precision paths on a GPU: replay bits, scalar fidelity against float32, step cost.

Run where a GPU is lent (about 4 minutes on one H200); without CUDA it says so and measures nothing.

    python benchmarks/gpu_check.py --mask ~/.cache/meerkat-fl/masks/sensitive-<id>.safetensors
    # both phases, into results/gpu_replay.json (tiny model) and results/gpu_model.json (SmolLM2-135M)

``replay``: a client's ZO steps on CUDA (tiny Llama, sparse and dense masks, each noise source) against the
server's replay of its (seed, scalar) path on CUDA and on the CPU: differing values (0 is bit-exact). A CPU
client on the same seeds and batches gives the scalars' CPU/CUDA spread.
``model``: SmolLM2-135M, SST-2 batch 8 x 64 (``zo_step.fixed_batch``), the sensitive 0.1% mask. Projected
gradients on 48 seeds with float32 on CUDA as the reference: float32 on the CPU, TF32 matmuls
(``set_float32_matmul_precision("high")``), bf16 and fp16 weights at eps 1e-3 and 1e-2; Pearson r, sign
agreement and the median magnitude ratio. Then the step cost as ratios to two plain forwards in the same
run (medians of paired repetitions): sparse and dense steps per noise source, float32 and bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zo_step import DEFAULT_DATA_DIR, fixed_batch
from zo_step import paired as zo_step_paired

from meerkat_fl.environment import environment
from meerkat_fl.errors import MeerkatError
from meerkat_fl.masks import build_mask, load_mask
from meerkat_fl.models import load_model, tiny_llama
from meerkat_fl.noise import NoiseSource
from meerkat_fl.tasks import Batch, get_task
from meerkat_fl.zo import MaskedParams, apply_step, replay, wants_noise_cache, zo_step

SOURCES = [NoiseSource("torch_cpu", "gaussian"), NoiseSource("philox", "gaussian"), NoiseSource("philox", "rademacher")]
SEEDS = 48
RESULTS = Path(__file__).resolve().parent / "results"
REPS = 9
DEVICE = "cuda"  # --device: "cpu" runs every phase's logic (a smoke test, not a GPU figure)
LR = 1e-4


def on(batch: Batch, device: torch.device | str) -> Batch:
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.last_index.to(device),
                 batch.labels.to(device), batch.label_token_ids.to(device))


def client_path(
    model, mask, noise: NoiseSource, batches: list[Batch], eps: float
) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Run the client's loop (zo_step, then apply_step with the step's cached noise); return (start values, the
    (seed, scalar) path, end values)."""
    task = get_task("sst2")
    params = MaskedParams(model, mask, cache_noise=wants_noise_cache("auto", mask), noise=noise)
    values = params.gather()
    start = values.clone()
    path = []
    for seed, batch in enumerate(batches, start=101):
        step = zo_step(lambda b=batch: task.loss(model, b), params, values, seed, eps)
        apply_step(values, mask, seed, step.scalar, LR, noise=noise, noise_fn=params.segment_noise)
        path.append((seed, step.scalar))
    params.forget_noise()
    params.write(values)
    return start, path, values


def replay_phase() -> dict:
    """Client on CUDA vs server replay on CUDA and on the CPU, per mask and noise source (tiny model)."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    cpu_batches = []
    for _ in range(6):
        ids = torch.randint(0, 49152, (4, 16), generator=generator)
        cpu_batches.append(Batch(ids, torch.ones_like(ids), torch.full((4,), 15), torch.tensor([0, 1, 0, 1]),
                                 torch.tensor([4912, 1580])))
    for kind, density in (("random", 0.05), ("dense", 1.0)):
        for noise in SOURCES:
            gpu = tiny_llama(0).model.to(DEVICE)
            cpu = tiny_llama(0).model
            mask = build_mask(gpu, kind, density, fingerprint="tiny", scope="linear", seed=3)
            start, path, client = client_path(gpu, mask, noise, [on(b, DEVICE) for b in cpu_batches], 1e-3)
            server_gpu = replay(start, mask, path, LR, noise=noise)
            server_cpu = replay(start.cpu(), mask, path, LR, noise=noise)
            _, cpu_path, _ = client_path(cpu, mask, noise, cpu_batches, 1e-3)
            gpu_scalars = np.array([s for _, s in path])
            cpu_scalars = np.array([s for _, s in cpu_path])
            rows.append({
                "mask": kind, "noise": noise.name, "values": int(start.numel()), "steps": len(path),
                "client_moved": int((client != start).sum()),  # the replay compares values that changed
                "server_device_differing": int((server_gpu != client).sum()),
                "server_cpu_differing": int((server_cpu != client.cpu()).sum()),
                "server_cpu_max_abs_diff": float((server_cpu - client.cpu()).abs().max()),
                "scalar_cpu_vs_device_max_rel": float(np.max(np.abs(cpu_scalars - gpu_scalars)
                                                             / np.maximum(np.abs(cpu_scalars), 1e-30))),
            })
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def scalars(model, mask, batch: Batch, eps: float, noise: NoiseSource) -> np.ndarray:
    task = get_task("sst2")
    params = MaskedParams(model, mask, cache_noise=True, noise=noise)
    values = params.gather()
    out = []
    for seed in range(SEEDS):
        out.append(zo_step(lambda: task.loss(model, batch), params, values, seed, eps).scalar)
        params.forget_noise()
    return np.array(out)


def fidelity(reference: np.ndarray, other: np.ndarray) -> dict:
    return {"pearson_r": float(np.corrcoef(reference, other)[0, 1]),
            "sign_agreement": float(np.mean(np.sign(reference) == np.sign(other))),
            "median_magnitude_ratio": float(np.median(np.abs(other) / np.abs(reference)))}


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` that returns only once the device has finished its work (so wall-clock time covers it)."""
    def run() -> None:
        fn()
        sync()
    return run


def paired(base: Callable[[], object], other: Callable[[], object]) -> dict:
    """``zo_step.paired`` (ABBA, per-repetition ratios) on device-synchronised calls: the median ratio
    other/base and each one's median seconds. Warm-up: the fused kernels compile on their first call."""
    sync()
    times_a, times_b, ratios = zo_step_paired(synced(base), synced(other), REPS, min(3, REPS))
    return {"ratio": statistics.median(ratios), "base_s": statistics.median(times_a),
            "other_s": statistics.median(times_b)}


def model_phase(mask_path: Path | None) -> dict:
    task = get_task("sst2")
    loaded = load_model("smollm2", device=DEVICE)
    model = loaded.model
    batch_cpu, source = fixed_batch(loaded.tokenizer, DEFAULT_DATA_DIR)
    batch = on(batch_cpu, DEVICE)
    try:
        if mask_path is None:
            raise MeerkatError("no --mask given")
        mask = load_mask(mask_path, loaded.fingerprint)
        mask_kind = "sensitive (cached, 0.1%)"
    except MeerkatError as error:  # no cached mask: a random one, said so in the JSON
        print(f"mask: {error}; using a random 0.1% mask", flush=True)
        mask = build_mask(model, "random", 1e-3, fingerprint=loaded.fingerprint, scope="linear", seed=0)
        mask_kind = "random (0.1%)"
    noise = NoiseSource("torch_cpu", "gaussian")
    result: dict = {"batch": source, "mask": mask_kind, "seeds": SEEDS, "fidelity": {}, "cost": {}}
    reference = {eps: scalars(model, mask, batch, eps, noise) for eps in (1e-3, 1e-2)}
    result["reference_median_abs"] = {str(eps): float(np.median(np.abs(v))) for eps, v in reference.items()}
    torch.set_float32_matmul_precision("high")
    result["fidelity"]["tf32 eps 1e-3"] = fidelity(reference[1e-3], scalars(model, mask, batch, 1e-3, noise))
    torch.set_float32_matmul_precision("highest")
    cpu_model = load_model("smollm2").model
    cpu_scalars = scalars(cpu_model, mask, batch_cpu, 1e-3, noise)
    result["fidelity"]["cpu fp32 eps 1e-3"] = fidelity(reference[1e-3], cpu_scalars)
    del cpu_model
    for dtype in (torch.bfloat16, torch.float16):
        low = load_model("smollm2", device=DEVICE).model.to(dtype)
        for eps in (1e-3, 1e-2):
            name = f"{str(dtype).removeprefix('torch.')} eps {eps:g}"
            result["fidelity"][name] = fidelity(reference[eps], scalars(low, mask, batch, eps, noise))
            print(name, result["fidelity"][name], flush=True)
        del low
    print(json.dumps(result["fidelity"], indent=1), flush=True)

    def two_forwards(m=model, b=batch):
        task.loss(m, b), task.loss(m, b)

    def tf32_forwards():
        torch.set_float32_matmul_precision("high")
        try:
            two_forwards()
        finally:
            torch.set_float32_matmul_precision("highest")

    def step_fn(m, kind: str, source: NoiseSource) -> Callable[[], object]:
        chosen = mask if kind == "sparse" else build_mask(m, "dense", 1.0, fingerprint="x", scope="all")
        params = MaskedParams(m, chosen, cache_noise=wants_noise_cache("auto", chosen), noise=source)
        values = params.gather()
        counter = iter(range(10**9))

        def step():
            seed = next(counter)
            s = zo_step(lambda: task.loss(m, batch), params, values, seed, 1e-3)
            apply_step(values, chosen, seed, s.scalar, 1e-9, noise=source, noise_fn=params.segment_noise)
            params.forget_noise()
        return step

    for kind in ("sparse", "dense"):
        for source in SOURCES:
            name = f"{kind} {source.name} fp32"
            result["cost"][name] = paired(two_forwards, step_fn(model, kind, source))
            print(name, result["cost"][name], flush=True)
    result["cost"]["two forwards tf32 vs fp32"] = paired(two_forwards, tf32_forwards)
    bf16 = load_model("smollm2", device=DEVICE, dtype="bf16").model
    result["cost"]["two forwards bf16 vs fp32"] = paired(two_forwards, lambda: two_forwards(bf16))
    result["cost"]["sparse torch_cpu/gaussian bf16 (vs fp32 forwards)"] = paired(
        two_forwards, step_fn(bf16, "sparse", noise))
    if DEVICE.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def print_table(result: dict) -> None:
    """The phase's rows as a fixed-width table."""
    if result["phase"] == "replay":
        print(f"{'mask':8} {'noise':22} {'server on device':>16} {'server on cpu':>14} {'scalar cpu/device':>18}")
        for r in result["rows"]:
            print(f"{r['mask']:8} {r['noise']:22} {r['server_device_differing']:>16} {r['server_cpu_differing']:>14} "
                  f"{r['scalar_cpu_vs_device_max_rel']:>18.1e}")
        print("(values differing from the client's after the replay; max relative scalar difference)")
        return
    print(f"{'fidelity vs float32 on ' + result['device']:34} {'r':>8} {'sign':>6} {'|g| ratio':>10}")
    for name, f in result["fidelity"].items():
        print(f"{name:34} {f['pearson_r']:>8.4f} {f['sign_agreement']:>6.2f} {f['median_magnitude_ratio']:>10.3f}")
    print(f"{'cost (vs two float32 forwards)':52} {'ratio':>7} {'forwards s':>11} {'other s':>9}")
    for name, c in result["cost"].items():
        print(f"{name:52} {c['ratio']:>7.2f} {c['base_s']:>11.4f} {c['other_s']:>9.4f}")


def main() -> None:
    global DEVICE, SEEDS, REPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["replay", "model", "all"], default="all")
    parser.add_argument("--mask", type=Path, help="the cached sensitive mask of SmolLM2 (safetensors)")
    parser.add_argument("--json", type=Path, help="one phase's JSON (default results/gpu_<phase>.json)")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test of the logic)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="projected gradients per fidelity row")
    parser.add_argument("--reps", type=int, default=REPS, help="paired repetitions per cost row")
    args = parser.parse_args()
    if args.seeds < 3 or args.reps < 1:
        parser.error("--seeds must be at least 3 (a correlation) and --reps at least 1")
    DEVICE, SEEDS, REPS = args.device, args.seeds, args.reps
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():  # `make bench` on a CPU machine
        print("gpu_check: no CUDA device visible, nothing measured (--device cpu runs the logic as a smoke test)")
        return
    for phase in ("replay", "model") if args.phase == "all" else (args.phase,):
        result = replay_phase() if phase == "replay" else model_phase(args.mask)
        result.update(phase=phase, device=DEVICE, environment=environment(DEVICE, "float32"),
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        print_table(result)
        path = args.json if args.json and args.phase != "all" else RESULTS / f"gpu_{phase}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
