"""Per-round cost of running Meerkat on Flower against the in-process simulator, and the client's model load.

One tiny-model federation (configs/tiny.toml, 2 clients, T=2, ``--rounds`` rounds) run four ways, all writing
the same run folder: the in-process simulator (``meerkat run``), Flower's Simulation Runtime (``meerkat flower
sim``), and a loopback deployment (SuperLink + 2 SuperNodes, ``meerkat flower deploy``) with and without the
persistent node worker. A round's time is the ``seconds`` column of metrics.jsonl (configure, send, wait for
replies, aggregate, evaluate, checkpoint); round 1 pays start-up (Ray, handshake, first load), so per-round
figures are medians over rounds 2..R. ``client_load_s`` is what a ClientApp process spends importing and
building the client side (model, data, mask) per message without the worker (the Deployment Engine starts
one process per message); ``client_load_worker_s`` the same with the worker (it loads once, at the handshake).

    HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/flower.py --json benchmarks/results/flower.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.flower.launch import run_deployment, run_simulation

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path(os.environ.get("MEERKAT_DATA_DIR", REPO.parent / "shared" / "data"))


def per_round(run: Path, key: str = "seconds") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [float(row.get(key, 0.0)) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "flower.json")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")
    # One torch thread everywhere (Ray gives its actors one too): on a shared 2-core box, 2 threads per
    # process oversubscribe and the tiny model's in-process round went from 0.1 s to 3.4 s.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    cfg = config.load(REPO / "configs" / "tiny.toml", [
        f"task.data_dir={json.dumps(str(args.data_dir))}", "fed.num_clients=2", f"fed.rounds={args.rounds}",
        "run.zero_shot=false"])
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="meerkat-bench-flower-") as tmp:
        tmp = Path(tmp)
        shapes = {
            "inproc": lambda out: simulate(cfg, out, progress=False),
            "flower_sim": lambda out: run_simulation(cfg, out, tmp / "w-sim"),
            "flower_deploy": lambda out: run_deployment(cfg, out, tmp / "w-dep", nodes=2),
            "flower_deploy_noworker": lambda out: run_deployment(cfg, out, tmp / "w-dep0", nodes=2, workers=False),
        }
        for name, run in shapes.items():
            tic = time.perf_counter()
            run(tmp / name)
            wall = time.perf_counter() - tic
            seconds = per_round(tmp / name)
            result[f"{name}_round_s"] = statistics.median(seconds[1:])
            result[f"{name}_first_round_s"] = seconds[0]
            result[f"{name}_wall_s"] = wall
            result[f"{name}_rounds_s"] = seconds
            if name.startswith("flower"):
                result[f"{name}_client_load_s"] = per_round(tmp / name, "client_load_s")
                result[f"{name}_client_fit_s"] = per_round(tmp / name, "client_fit_s")
                summary = json.loads((tmp / name / "summary.json").read_text())
                result[f"{name}_wire_bytes_per_round"] = (summary["flower_bytes_down"] + summary["flower_bytes_up"]) / args.rounds
                result[f"{name}_meerkat_bytes_per_round"] = summary["bytes_up_per_round"] + summary["bytes_down_per_round"]
    loads = result["flower_deploy_noworker_client_load_s"]
    result["client_load_s"] = statistics.median(loads)  # before: every round, in a fresh process
    result["client_load_worker_s"] = statistics.median(result["flower_deploy_client_load_s"])  # after
    result["flower_sim_overhead_s"] = result["flower_sim_round_s"] - result["inproc_round_s"]
    result["flower_deploy_overhead_s"] = result["flower_deploy_round_s"] - result["inproc_round_s"]
    result["flower_deploy_noworker_overhead_s"] = result["flower_deploy_noworker_round_s"] - result["inproc_round_s"]
    result["setup"] = {"config": "configs/tiny.toml, 2 clients, T=2", "rounds": args.rounds,
                       "torch_threads": torch.get_num_threads(),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
                       "date": datetime.date.today().isoformat()}
    try:
        import flwr

        result["setup"]["flwr"] = flwr.__version__
    except (ImportError, AttributeError):
        pass

    print(f"{'engine':<28}{'round (s)':>11}{'round 1 (s)':>13}{'over in-proc (s)':>18}{'client load (s)':>17}")
    for name in ("inproc", "flower_sim", "flower_deploy", "flower_deploy_noworker"):
        over = result[f"{name}_round_s"] - result["inproc_round_s"]
        load = statistics.median(result.get(f"{name}_client_load_s", [0.0]))
        print(f"{name:<28}{result[f'{name}_round_s']:>11.2f}{result[f'{name}_first_round_s']:>13.2f}{over:>18.2f}{load:>17.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
