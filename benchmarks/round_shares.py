"""How much of each round's update one client carries: the largest replay weight per round of a cached paper cell.

Replay weights each sampled client by its shard size (`fed.weighting = "data_size"`), so under Dirichlet 0.1 a
round that samples one large single-label client beside small ones is that client's update. Written for claim 2d
(issue 17), where AG News seed 0's Dirichlet 0.1 runs collapse to near one class at T = 10 and 50. Everything is
rebuilt from the repository: the clients of each round from the cell's committed GradIP records, the shard sizes
by re-partitioning the cell's own training rows (`build.train_rows`, `build.partition_for`: no model is loaded).

    MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/round_shares.py            # AG News Dirichlet 0.1
    MEERKAT_DATA_DIR=../shared/data .venv/bin/python benchmarks/round_shares.py CELL.json ... --json out.json

It prints a table (per cell: rounds, median largest share, rounds where one client carries 80% or more, the last
round's largest share, its client's size and dominant label) and writes results/paper/round_shares.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paper_grid as grid

from meerkat_fl import config
from meerkat_fl.build import partition_for, train_rows
from meerkat_fl.errors import DataError, MeerkatError
from meerkat_fl.fed.aggregate import normalised_weights
from meerkat_fl.paths import output_file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CELLS = sorted((REPO / "benchmarks" / "results" / "paper" / "cells").glob(
    "test-ag_news-meerkat-drift-T*-dirichlet01-*.json"))  # claim 2d by shard size, 2w uniform
DEFAULT_JSON = REPO / "benchmarks" / "results" / "paper" / "round_shares.json"
DOMINANT = 0.8  # a round "is one client's" when it carries this share or more


def rounds_of(cell: Mapping[str, Any], source: str) -> dict[int, list[int]]:
    """Round -> the clients replayed in it, from a cell's GradIP records (one per client and round)."""
    records = cell.get("gradip")
    if not isinstance(records, list) or not records:
        raise DataError(f"{source}: no GradIP records, so which clients took part in each round is unknown")
    rounds: dict[int, list[int]] = {}
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("round"), int) \
                or not isinstance(record.get("client_id"), int):
            raise DataError(f"{source}: a GradIP record lacks an integer round or client_id: {str(record)[:80]}")
        rounds.setdefault(record["round"], []).append(record["client_id"])
    return dict(sorted(rounds.items()))


def largest_shares(rounds: Mapping[int, Sequence[int]], sizes: Sequence[int], weighting: str) -> list[tuple[int, float]]:
    """Per round: the client with the largest replay weight and that weight (the server's own normalised_weights)."""
    out = []
    for r, clients in rounds.items():
        if any(not 0 <= c < len(sizes) for c in clients):
            raise DataError(f"round {r} names a client outside 0..{len(sizes) - 1}: {sorted(clients)}")
        weights = normalised_weights({c: int(sizes[c]) for c in clients}, weighting)
        top = max(weights, key=lambda c: (weights[c], -c))
        out.append((top, weights[top]))
    return out


def cell_shares(path: Path) -> dict[str, Any]:
    try:
        cell = json.loads(path.read_text())
        if not isinstance(cell, dict):
            raise TypeError("the file holds no JSON object")
        spec = grid.Cell(**cell["cell"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a paper cell ({type(exc).__name__}: {exc})") from None
    cfg = config.validate(config.resolve_environment(config.load(None, spec.overrides())))
    _, train, _ = train_rows(cfg.task, cfg.run.seed)
    labels = np.asarray(train.partition_labels)
    partition = partition_for(cfg, labels)
    sizes = [len(c) for c in partition.clients]
    shares = largest_shares(rounds_of(cell, str(path)), sizes, cfg.fed.weighting)
    last_client, last_share = shares[-1]
    held = labels[partition.clients[last_client]]
    counts = np.bincount(held[held >= 0], minlength=max(int(labels.max()) + 1, 1))  # -1: a row without a label
    return {"cell": path.stem, "weighting": cfg.fed.weighting, "sizes": sizes, "rounds": len(shares),
            "largest_share": [round(s, 4) for _, s in shares],
            "median_largest": float(np.median([s for _, s in shares])),
            "rounds_dominated": sum(s >= DOMINANT for _, s in shares),
            "last_round": {"client": last_client, "share": round(last_share, 4), "size": sizes[last_client],
                           "dominant_label": int(counts.argmax()),
                           "dominant_fraction": round(float(counts.max() / max(counts.sum(), 1)), 4)},
            "final_accuracy": (cell.get("summary") or {}).get("final/accuracy")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="*", type=Path, help="cached cell JSONs (default: AG News Dirichlet 0.1)")
    parser.add_argument("--json", type=Path, default=None, help=f"where to write (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    paths = args.cells or DEFAULT_CELLS
    try:
        if not paths:
            raise DataError("no cells given and no AG News Dirichlet 0.1 cells cached")
        out = output_file(args.json or DEFAULT_JSON, "--json")
        rows = [cell_shares(p) for p in paths]
    except MeerkatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"| cell | rounds | median largest share | rounds >= {DOMINANT:.0%} one client | last round: share "
          "(client, size, dominant label) | final accuracy |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        last = row["last_round"]
        print(f"| {row['cell']} | {row['rounds']} | {row['median_largest']:.2f} | {row['rounds_dominated']} | "
              f"{last['share']:.2f} ({last['client']}, {last['size']}, {last['dominant_label']} at "
              f"{last['dominant_fraction']:.0%}) | {row['final_accuracy']} |")
    out.write_text(json.dumps({"dominant": DOMINANT, "cells": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
