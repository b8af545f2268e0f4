"""Device check of the "philox" noise: its bits on a device equal the NumPy reference's; its throughput there.

Run on a machine with a GPU (about a minute); on a CPU it is the same check the tests make:

    python benchmarks/noise_device.py --device cuda --json benchmarks/results/noise_device.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from meerkat_fl import noise_reference
from meerkat_fl.noise import NoiseSource, segment_seed

CASES = [(0, 0, 1), (1, 0, 3), (7, 2, 129), (2**62 + 5, 11, 300_001), (12345, 3, 5_000_003)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--size", type=int, default=1 << 26, help="values per throughput draw")
    args = parser.parse_args()
    device = torch.device(args.device)
    result: dict = {"device": str(device), "torch": torch.__version__, "cases": [], "values_per_s": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for kind in ("gaussian", "rademacher"):
        source = NoiseSource("philox", kind)
        for seed, position, size in CASES:
            ours = source.segment(seed, position, size, device).cpu().numpy().view(np.int32)
            ref = noise_reference.segment(kind, segment_seed(seed, position), size).view(np.int32)
            differ = int((ours != ref).sum())
            result["cases"].append({"kind": kind, "seed": seed, "position": position, "size": size,
                                    "differing_values": differ})
        source.segment(1, 0, 1 << 20, device)  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        source.segment(9, 0, args.size, device)
        sync()
        result["values_per_s"][kind] = args.size / (time.perf_counter() - start)
    result["bit_identical"] = all(case["differing_values"] == 0 for case in result["cases"])
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
