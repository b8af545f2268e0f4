"""The federated simulator in the demo's setting: accuracy, bytes, time per round and peak memory per method,
and the simulator's peak memory with 10 vs 100 clients.

Every run is a fresh child process (the script re-invokes itself) running ``simulate`` on the packaged demo
config (SmolLM2-135M, SST-2, 10 clients, Dirichlet alpha=0.5, 5 sampled per round, T=2, 8 rounds). The child
resets the kernel's RSS high-water mark once the federation is built (model, data, mask and clients), so the
peak reported is what the rounds need, not the ~2x transient of loading the model; the lifetime peak is kept
too. Seconds per round are the median over rounds without evaluation.

The client-count comparison runs the same setting with 10 and with 100 clients (IID, so no client is empty;
5 sampled per round either way, 2 rounds, no evaluation): the per-round work is the same, so any growth in
peak RSS is what holding more clients costs. Goal: ratio <= 1.05.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated.py --json benchmarks/results/federated.json

The first-order upper bound beside Meerkat (backprop's memory and the masked-delta uplink):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated.py --methods meerkat fedavg_fo --no-clients \
        --json benchmarks/results/federated_fo.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from meerkat_fl import config, memory
from meerkat_fl.demo import DEMO_CONFIG, FULL_FEDZO
from meerkat_fl.rundir import EVAL, FINAL, ZERO_SHOT, primary_metric, read_metric, unprefixed

REPO = Path(__file__).resolve().parent.parent
# Methods in the demo's setting: each differs from Meerkat only by these overrides (same T, rounds, forwards).
METHODS = {
    "meerkat": [],
    "full_fedzo": FULL_FEDZO,
    "random_mask": ["mask.kind=random"],
    "magnitude_mask": ["mask.kind=magnitude"],
    # the first-order upper bound: backprop on Meerkat's mask (fo.lr, fo.optimizer: the method's defaults)
    "fedavg_fo": ["method='fedavg_fo'"],
}
DEFAULT_METHODS = ["meerkat", "full_fedzo"]
CLIENT_COUNTS = (10, 100)
CLIENT_SCALING = ["fed.partition=iid", "fed.sample_count=5", "fed.rounds=2", "run.zero_shot=false",
                  "run.eval_every=0", "run.checkpoint_every=2"]
GOAL_MEMORY_RATIO = 1.05


def child_run(out: Path, overrides: list[str]) -> dict:
    """Child: one ``simulate`` run; the summary plus peak RSS while the rounds ran."""
    from meerkat_fl.fed.simulate import simulate

    marks: dict[str, float | bool] = {}

    def built(fed) -> None:
        marks["built_rss_mb"] = memory.rss_mb()
        marks["peak_was_reset"] = memory.reset_peak()

    cfg = config.validate(config.resolve_environment(config.load(DEMO_CONFIG, overrides)))
    summary = simulate(cfg, out, progress=False, on_built=built)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    plain = [r["seconds"] for r in rows if not unprefixed(EVAL, r)] or [r["seconds"] for r in rows]
    return {
        "summary": summary,
        "seconds_per_round": statistics.median(plain),
        "peak_rss_mb": memory.peak_mb() if marks.get("peak_was_reset") else memory.lifetime_peak_mb(),
        "lifetime_peak_rss_mb": memory.lifetime_peak_mb(),
        **marks,
    }


def run_child(out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child run {overrides} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def method_row(name: str, child: dict) -> dict:
    s = child["summary"]
    return {
        "method": name,
        "zero_shot_accuracy": read_metric(s, ZERO_SHOT, primary_metric(s)),
        "final_accuracy": read_metric(s, FINAL, primary_metric(s)),
        "bytes_up_per_round": s["bytes_up_per_round"],
        "bytes_down_per_round": s["bytes_down_per_round"],
        "seconds_per_round": child["seconds_per_round"],
        "wall_seconds": s["wall_seconds"],
        "peak_rss_mb": child["peak_rss_mb"],
        "lifetime_peak_rss_mb": child["lifetime_peak_rss_mb"],
        "trainable_values": s["trainable_values"],
    }


def clients_result(clients: list[dict]) -> dict:
    peaks = [c["peak_rss_mb"] for c in clients]
    return {
        "counts": list(CLIENT_COUNTS),
        "peak_rss_mb": peaks,
        "built_rss_mb": [c["built_rss_mb"] for c in clients],
        "seconds_per_round": [c["seconds_per_round"] for c in clients],
        "ratio": peaks[1] / peaks[0],
        "goal": GOAL_MEMORY_RATIO,
        "met": peaks[1] / peaks[0] <= GOAL_MEMORY_RATIO,
    }


def print_table(result: dict) -> None:
    rows = result["methods"]
    base = next((r for r in rows if r["method"] == "meerkat"), rows[0])
    print(f"\nFederated simulator, demo setting ({result['setting']}), {result['machine']['cpu_count']} CPUs")
    head = f"{'method':<16}{'zero-shot':>10}{'final':>8}{'up B/rnd':>11}{'down B/rnd':>14}{'s/round':>9}" \
           f"{'x meerkat':>10}{'peak MB':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['method']:<16}{r['zero_shot_accuracy']:>10.3f}{r['final_accuracy']:>8.3f}"
              f"{r['bytes_up_per_round']:>11,.0f}{r['bytes_down_per_round']:>14,.0f}{r['seconds_per_round']:>9.1f}"
              f"{r['seconds_per_round'] / base['seconds_per_round']:>10.2f}{r['peak_rss_mb']:>9.0f}")
    c = result["clients"]
    if c is None:
        return
    print(f"\npeak RSS during rounds: {CLIENT_COUNTS[0]} clients {c['peak_rss_mb'][0]:.0f} MB, "
          f"{CLIENT_COUNTS[1]} clients {c['peak_rss_mb'][1]:.0f} MB, ratio {c['ratio']:.3f} "
          f"(goal <= {GOAL_MEMORY_RATIO}: {'met' if c['ratio'] <= GOAL_MEMORY_RATIO else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "federated.json")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (e.g. fed.rounds=4)")
    parser.add_argument("--no-clients", action="store_true",
                        help="skip the 10 vs 100 clients memory comparison (only compare methods)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        print(json.dumps(child_run(args.child, rest)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.methods:
            print(f"running {name} ...", flush=True)
            rows.append(method_row(name, run_child(Path(tmp) / name, [*METHODS[name], *args.set])))
        clients = [] if args.no_clients else [
            run_child(Path(tmp) / f"clients-{n}", [*CLIENT_SCALING, f"fed.num_clients={n}", *args.set])
            for n in CLIENT_COUNTS
        ]
    cfg = config.load(DEMO_CONFIG, args.set)
    result = {
        "setting": f"{cfg.task.name}, {cfg.fed.num_clients} clients, {cfg.fed.partition} alpha={cfg.fed.alpha}, "
                   f"{cfg.fed.sample_count} per round, T={cfg.fed.local_steps}, {cfg.fed.rounds} rounds, "
                   f"batch {cfg.zo.batch_size}, max_length {cfg.task.max_length}",
        "overrides": args.set,
        "methods": rows,
        "clients": clients_result(clients) if clients else None,
        "machine": {"processor": platform.processor(), "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/federated.py " + " ".join(sys.argv[1:]),
    }
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
