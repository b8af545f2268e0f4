"""One hostile client of ten, with and without the robust bound (fed/robust.py), in the demo's setting.

The demo config (SmolLM2-135M embedded, SST-2, 10 clients, Dirichlet alpha=0.5, T=2, batch 8) with every
client sampled each round, so the attacker answers every round. Client 0 is hostile: a wrapper transport
rewrites its reply bytes after it trained honestly (it knows its own honest scalars g):
- ``max``: every scalar at the largest magnitude the server accepts (0.99 x fed.max_abs_scalar), pointing
  against its honest g; under the defence the server clips it to the round's bound, so this is the
  "largest value the defence accepts, every round" (anything larger is clipped to the same thing);
- ``flip``: its honest scalars sign-flipped and scaled, -k g (k = --flip-scale).
Each attack runs with the defence on (fed.clip=norm, fed.clip_factor=2: the factor that meets the <= 3x goal;
the library's default is 4, see the README) and off
(fed.clip=none: only the absolute cap), against an all-honest run with the same defence setting.

Per run: final accuracy, bytes, and per round each accepted client's update norm ||w_k^T - w^{r-1}||
(replayed from its path as the server aggregated it). ``attacker_norm_ratio``: the attacker's norm over the
median honest client's, worst round, defence on. Goal: defended drop <= 2 points, ratio <= 3.

Resumable: each run's result is cached as JSON under --cache; rerunning skips finished runs.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MEERKAT_DATA_DIR=../shared/data \\
        .venv/bin/python benchmarks/robustness.py --json benchmarks/results/robustness.json [--rounds 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from meerkat_fl import config
from meerkat_fl.demo import DEMO_CONFIG
from meerkat_fl.fed.aggregate import client_endpoint
from meerkat_fl.fed.messages import ClientUpdate, decode_update, encode_update
from meerkat_fl.fed.simulate import build_federation, evaluate
from meerkat_fl.fed.transport import InProcessTransport

REPO = Path(__file__).resolve().parent.parent
ATTACKER = 0
DEFENCES = {"defended": ["fed.clip=norm", "fed.clip_factor=2"], "undefended": ["fed.clip=none"]}
ORDER = ("defended-honest", "defended-max", "defended-flip", "undefended-max", "undefended-flip", "undefended-honest")
GOAL_DROP, GOAL_RATIO = 0.02, 3.0


class HostileTransport:
    """The in-process transport, with one client's reply bytes rewritten: scalars -> attack(honest g)."""

    def __init__(self, inner: InProcessTransport, attacker: int, attack):
        self.inner, self.attacker, self.attack = inner, attacker, attack

    def send_and_receive(self, plans):
        replies = self.inner.send_and_receive(plans)
        if replies.get(self.attacker) is not None:
            honest = decode_update(replies[self.attacker])
            scalars = np.asarray(self.attack(honest.scalars), np.float32)
            replies[self.attacker] = encode_update(ClientUpdate(honest.round, honest.client_id, scalars, honest.losses,
                                                                honest.num_examples, honest.metrics))
        return replies


def attacks(cap: float, flip_scale: float) -> dict:
    return {
        "honest": None,
        "max": lambda g: -np.where(g == 0, 1.0, np.sign(g)) * 0.99 * cap,
        "flip": lambda g: -flip_scale * g,
    }


def one_run(cfg, attack) -> dict:
    """Train ``cfg.fed.rounds`` rounds; accuracy, bytes and per-round client update norms."""
    fed = build_federation(cfg)
    transport = InProcessTransport(fed.clients, fed.runtime)
    if attack is not None:
        transport = HostileTransport(transport, ATTACKER, attack)
    rounds, tic = [], time.perf_counter()
    bytes_up = bytes_down = 0
    for _ in range(cfg.fed.rounds):
        start = fed.server.values.clone()
        plans, encoded = fed.server.configure_round()
        result = fed.server.aggregate_round(plans, encoded, transport.send_and_receive(encoded))
        norms = {p.client_id: float((client_endpoint(start, fed.params.mask, p) - start).norm()) for p in result.paths}
        honest = [v for k, v in norms.items() if k != ATTACKER]
        median = statistics.median(honest) if honest else float("nan")
        rounds.append({"round": result.round + 1, "norms": {str(k): v for k, v in norms.items()},
                       "attacker_ratio": norms.get(ATTACKER, 0.0) / median if median > 0 else None,
                       "clip_bound": result.metrics.get("clip_bound"), "rejected": sorted(result.rejected),
                       "clipped": result.metrics.get("clipped_by_client", {}), "train_loss": result.train_loss})
        bytes_up += sum(result.bytes_up.values())
        bytes_down += sum(result.bytes_down.values())
    return {"accuracy": evaluate(fed)["accuracy"], "rounds": rounds, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "seconds": time.perf_counter() - tic,
            "max_abs_weight_change": float((fed.server.values - fed.runtime.initial_values).abs().max())}


def worst_ratio(run: dict) -> float:
    ratios = [r["attacker_ratio"] for r in run["rounds"] if r["attacker_ratio"] is not None]
    return max(ratios) if ratios else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "robustness.json")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "results" / "robustness_runs")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--flip-scale", type=float, default=10.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=ORDER, help="runs not to start (cached ones are used)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (e.g. task.eval_size=100)")
    args = parser.parse_args()

    base = ["fed.sample_count=none", "fed.sample_fraction=1.0", f"fed.rounds={args.rounds}", *args.set]
    cfg0 = config.validate(config.resolve_environment(config.load(DEMO_CONFIG, base)))
    args.cache.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    for key in ORDER:  # the undefended honest run last: the others matter more when time is short
        defence, name = key.split("-")
        cfg = config.validate(config.apply_overrides(cfg0, DEFENCES[defence]))
        path = args.cache / f"{key}-r{args.rounds}-k{args.flip_scale:g}.json"
        if path.exists():
            runs[key] = json.loads(path.read_text())
            print(f"{key}: cached ({path.name})", flush=True)
        elif key not in args.skip:
            print(f"{key}: running {args.rounds} rounds ...", flush=True)
            attack = attacks(cfg.fed.max_abs_scalar, args.flip_scale)[name]
            runs[key] = {"overrides": [*base, *DEFENCES[defence]], **one_run(cfg, attack)}
            path.write_text(json.dumps(runs[key], indent=1) + "\n")
            print(f"{key}: accuracy {runs[key]['accuracy']:.3f} in {runs[key]['seconds']:.0f} s", flush=True)

    def drop(defence: str, name: str) -> float | None:
        honest = runs.get(f"{defence}-honest") or runs.get("defended-honest")  # fallback: see "honest_reference"
        attacked = runs.get(f"{defence}-{name}")
        return None if honest is None or attacked is None else honest["accuracy"] - attacked["accuracy"]

    def loss_increase(defence: str, name: str) -> float | None:
        honest = runs.get(f"{defence}-honest") or runs.get("defended-honest")
        attacked = runs.get(f"{defence}-{name}")
        if honest is None or attacked is None:
            return None
        return attacked["rounds"][-1]["train_loss"] - honest["rounds"][-1]["train_loss"]

    def worst(values) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    defended_drop = worst(drop("defended", a) for a in ("max", "flip"))
    ratio = worst(worst_ratio(runs[f"defended-{a}"]) for a in ("max", "flip") if f"defended-{a}" in runs)
    met = defended_drop is not None and ratio is not None and defended_drop <= GOAL_DROP and ratio <= GOAL_RATIO
    result = {
        "setting": f"{cfg0.task.name}, {cfg0.fed.num_clients} clients (all sampled), {cfg0.fed.partition} "
                   f"alpha={cfg0.fed.alpha}, T={cfg0.fed.local_steps}, {args.rounds} rounds, batch {cfg0.zo.batch_size},"
                   f" eval {cfg0.task.eval_size}; client {ATTACKER} hostile; defence fed.clip=norm "
                   f"factor {cfg0.fed.clip_factor}, cap {cfg0.fed.max_abs_scalar:g}; flip scale {args.flip_scale:g}",
        "honest_accuracy": runs["defended-honest"]["accuracy"],
        "honest_accuracy_undefended": runs.get("undefended-honest", {}).get("accuracy"),
        # each drop is against the all-honest run with the same defence setting, when it was run
        "honest_reference": {d: f"{d}-honest" if f"{d}-honest" in runs else "defended-honest" for d in DEFENCES},
        "defended_accuracy_drop": defended_drop,
        "undefended_accuracy_drop": worst(drop("undefended", a) for a in ("max", "flip")),
        "attacker_norm_ratio": ratio,
        "goal": {"defended_drop": GOAL_DROP, "attacker_norm_ratio": GOAL_RATIO, "met": met},
        # in a short run accuracy barely moves and a wrecked model can still guess the majority label: the
        # clients' training loss in the last round (measured on the model the previous rounds produced) and
        # the largest weight change show the damage accuracy can hide
        "last_train_loss_increase": {d: worst(loss_increase(d, a) for a in ("max", "flip")) for d in DEFENCES},
        "skipped": sorted(set(ORDER) - set(runs)),
        "runs": {k: {"accuracy": r["accuracy"], "attacker_norm_ratio_worst": worst_ratio(r),
                     "max_abs_weight_change": r["max_abs_weight_change"], "bytes_up": r["bytes_up"],
                     "train_loss_by_round": [x["train_loss"] for x in r["rounds"]],
                     "bytes_down": r["bytes_down"], "seconds": r["seconds"],
                     "attacker_clipped_per_round": [x["clipped"].get(str(ATTACKER)) for x in r["rounds"]],
                     "honest_clipped_total": sum(v for x in r["rounds"] for c, v in x["clipped"].items()
                                                 if c != str(ATTACKER))}
                 for k, r in runs.items()},
        "machine": {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/robustness.py " + " ".join(sys.argv[1:]),
    }
    print(f"\nOne hostile client of {cfg0.fed.num_clients} ({result['setting']})")
    head = (f"{'run':<22}{'accuracy':>9}{'drop':>7}{'att/med norm':>13}{'max |dw|':>10}{'last loss':>10}"
            f"{'honest clipped':>15}")
    print(head + "\n" + "-" * len(head))
    for key, row in result["runs"].items():
        defence, name = key.split("-")
        print(f"{key:<22}{row['accuracy']:>9.3f}{drop(defence, name) or 0.0:>7.3f}{row['attacker_norm_ratio_worst']:>13.3g}"
              f"{row['max_abs_weight_change']:>10.3g}{row['train_loss_by_round'][-1]:>10.3f}"
              f"{row['honest_clipped_total']:>15d}")
    print(f"\ndefended drop {defended_drop} (goal <= {GOAL_DROP}), attacker norm ratio {ratio} "
          f"(goal <= {GOAL_RATIO}): {'met' if met else 'NOT met'}; not run: {result['skipped'] or 'none'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
