"""The simulator's memory does not grow with the number of clients: clients share one model.

Each federation runs in a fresh child process, which resets the kernel's RSS high-water mark once the
federation is built and reports the peak while two rounds run (5 clients sampled per round either way).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from meerkat_fl import memory

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from meerkat_fl import config, memory
    from meerkat_fl.fed.simulate import simulate

    config_path, out, clients = sys.argv[1:]
    cfg = config.load(config_path, [f"fed.num_clients={clients}",
                                    "fed.partition='iid'", "fed.sample_count=5", "fed.rounds=2",
                                    "run.zero_shot=false", "run.eval_every=0", "task.train_size=400"])
    marks = {}
    def built(fed):
        marks["reset"] = memory.reset_peak()
        marks["model_mb"] = sum(p.numel() * p.element_size() for p in fed.data.scorer.model.parameters()) / 2**20
        marks["clients"] = len(fed.clients)
    summary = simulate(cfg, Path(out), progress=False, on_built=built)
    print(json.dumps({"peak_mb": memory.peak_mb(), "rounds": summary["rounds"], **marks}))
    """
)


def peak_with(clients: int, tmp_path) -> dict:
    from pathlib import Path

    config_path = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(config_path), str(tmp_path / f"run-{clients}"), str(clients)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_clients(tmp_path):
    if not memory.reset_peak():
        pytest.skip("this kernel cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    few, many = peak_with(10, tmp_path), peak_with(100, tmp_path)
    assert few["reset"] and many["reset"]
    assert (few["clients"], many["clients"]) == (10, 100)
    # One model copy per extra client would add 90 x model_mb; even a single extra copy is ruled out.
    assert many["peak_mb"] - few["peak_mb"] < few["model_mb"], (few, many)
    assert many["peak_mb"] / few["peak_mb"] <= 1.05, (few, many)


PROBE = textwrap.dedent(
    """
    import json
    from meerkat_fl import memory
    reset = memory.reset_peak()
    before = memory.peak_mb()
    block = bytearray(64 * 2**20)
    block[::4096] = b"\\x01" * len(block[::4096])  # touch every page of 64 MB
    print(json.dumps({"reset": reset, "rss": memory.rss_mb(), "lifetime": memory.lifetime_peak_mb(),
                      "before": before, "after": memory.peak_mb()}))
    """
)


def test_memory_helpers_see_a_fresh_allocation():
    """In a fresh process (a long-lived one may reuse already resident freed memory)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["rss"] > 10 and probe["lifetime"] >= probe["rss"]
    if probe["reset"]:
        assert probe["after"] >= probe["before"] + 48, probe
