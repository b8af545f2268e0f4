"""The demo's Meerkat run at several seeds: is its gain over zero-shot larger than the spread between seeds?

Runs the demo config (``src/meerkat_fl/configs/demo.toml``, Meerkat only: Full-FedZO at its lr does not move
the model, see the README) once per seed into ``<runs>/meerkat_s<seed>/`` (a finished run folder is read, not
rerun; an unfinished one resumes), then writes ``results/demo_seeds.json`` and prints a table: zero-shot, the
accuracy at every evaluation, the gain, and its mean and standard deviation over seeds. The seed changes the
clients' Dirichlet partition, their data order and every step's noise; the test rows are the same.

    HF_HUB_OFFLINE=1 python benchmarks/demo_seeds.py --seeds 0 1 2 --runs /tmp/demo_seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from meerkat_fl import config
from meerkat_fl.demo import DEMO_CONFIG
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.rundir import RunDir

RESULTS = Path(__file__).parent / "results"


def run_seed(seed: int, runs: Path) -> Path:
    out = runs / f"meerkat_s{seed}"
    if not (out / "summary.json").exists():
        cfg = config.validate(config.resolve_environment(config.load(DEMO_CONFIG, [f"run.seed={seed}"])))
        simulate(cfg, out, resume=(out / "config.toml").exists(), progress=True)
    return out


def curve(out: Path) -> dict[str, float]:
    run = RunDir(out)
    points = {0: json.loads((out / "zero_shot.json").read_text())["zero_shot/accuracy"]}
    for row in run.read_metrics():
        if "eval/accuracy" in row:
            points[int(row["round"])] = row["eval/accuracy"]
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/demo_seeds"))
    args = parser.parse_args(argv)
    curves = {seed: curve(run_seed(seed, args.runs)) for seed in args.seeds}
    last = min(max(c) for c in curves.values())  # the last round every seed reached
    gains = [c[last] - c[0] for c in curves.values()]
    finals = [c[last] for c in curves.values()]
    result = {"config": str(DEMO_CONFIG.name), "seeds": args.seeds, "round": last,
              "curves": {str(s): {str(r): a for r, a in c.items()} for s, c in curves.items()},
              "zero_shot": [c[0] for c in curves.values()], "final": finals, "gain": gains,
              "gain_mean": statistics.mean(gains), "final_sd": statistics.stdev(finals) if len(finals) > 1 else None}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_seeds.json").write_text(json.dumps(result, indent=1))
    rounds = sorted({r for c in curves.values() for r in c})
    print("| seed | " + " | ".join("zero-shot" if r == 0 else f"round {r}" for r in rounds) + " | gain |")
    print("|---|" + "---|" * (len(rounds) + 1))
    for seed, c in curves.items():
        print(f"| {seed} | " + " | ".join(f"{c[r]:.3f}" if r in c else "-" for r in rounds)
              + f" | {c[last] - c[0]:+.3f} |")
    sd = result["final_sd"]
    print(f"gain {result['gain_mean']:+.3f} on average at round {last}; final accuracy sd over seeds "
          f"{'n/a' if sd is None else f'{sd:.3f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
