"""Fuzz the wire decoders: every structured header mutation once, then seeded random bytes, byte flips and
truncations for --seconds. Prints cases per second and failures (any exception other than MessageRejected,
escaping a decoder or the validators run on what it decoded); writes JSON.

The cases come from ``meerkat_fl.fed.fuzz`` (the fuzz test in ``tests/test_messages.py`` runs a bounded
sample of the same). Exit status 1 when anything failed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py --json benchmarks/results/fuzz.json [--seconds 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from meerkat_fl.fed import fuzz

REPO = Path(__file__).resolve().parent.parent
BATCH = 2000  # random cases per batch between clock checks


def merge(total: dict, part: dict) -> None:
    for family, row in part["families"].items():
        into = total["families"].setdefault(family, dict.fromkeys(row, 0))
        for key, value in row.items():
            into[key] += value
    total["failures"].extend(part["failures"][: max(0, 20 - len(total["failures"]))])
    total["slowest_case_seconds"] = max(total["slowest_case_seconds"], part["slowest_case_seconds"])
    total["cases"] += part["cases"]
    total["failed"] += part["failed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "fuzz.json")
    parser.add_argument("--seconds", type=float, default=60.0, help="time for the random phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    total = {"families": {}, "failures": [], "slowest_case_seconds": 0.0, "cases": 0, "failed": 0}
    tic = time.perf_counter()
    merge(total, fuzz.run(fuzz.all_structured()))
    structured_seconds = time.perf_counter() - tic
    rng, samples = np.random.default_rng(args.seed), fuzz.samples()
    tic = time.perf_counter()
    while time.perf_counter() - tic < args.seconds:
        merge(total, fuzz.run(fuzz.random_cases(rng, samples, BATCH)))
    random_seconds = time.perf_counter() - tic
    random_cases = sum(r["cases"] for f, r in total["families"].items() if f not in ("structured", "nesting"))
    structured_cases = total["cases"] - random_cases
    result = {
        **total,
        "structured_cases_per_second": structured_cases / structured_seconds,
        "random_cases_per_second": random_cases / random_seconds,
        "seconds": structured_seconds + random_seconds,
        "seed": args.seed,
        "machine": {"machine": platform.machine(), "cpu_count": os.cpu_count()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/fuzz.py " + " ".join(sys.argv[1:]),
    }
    head = f"{'family':<12}{'cases':>10}{'accepted':>10}{'rejected':>10}{'failed':>8}"
    print(head + "\n" + "-" * len(head))
    for family, row in total["families"].items():
        print(f"{family:<12}{row['cases']:>10}{row['accepted']:>10}{row['rejected']:>10}{row['failed']:>8}")
    print(f"\n{total['cases']} cases in {result['seconds']:.1f} s: structured {result['structured_cases_per_second']:.0f}"
          f"/s, random {result['random_cases_per_second']:.0f}/s; slowest case {total['slowest_case_seconds'] * 1e3:.1f} ms;"
          f" failures {total['failed']}")
    for failure in total["failures"]:
        print(f"  {failure['case']}: {failure['error']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    sys.exit(1 if total["failed"] else 0)


if __name__ == "__main__":
    main()
