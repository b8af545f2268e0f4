"""What the paper grid's GradIP logs show: claim 2d's within-round decay and the per-client plots.

Every cell with a sensitive mask caches the GradIP of each replayed local step (``gradip_records``: from the cell
cache, else from its run folder). Claim 2d's cells run T consecutive local steps per client between two syncs, the
setting in which a one-label client can fit its label within a round; ``drift_gradip`` measures, per task, T and
partition, how much |GradIP| falls over those steps and how well that tells a one-label client-round from an IID
one. Nothing runs here: everything is read from the cache, so ``paper.py --report-only`` stays seconds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import paper_grid as grid  # settings and paths read as grid.X, so a test patching paper_grid is seen here
from paper_grid import Cell

# [choice] A round's decay is the mean |GradIP| over its first fifth over the mean over its last fifth. The
# detector is benchmarks/vp.py's (2x decay with half the late steps quiet below 0.25x the early mean) on windows
# scaled to the round: early [0, T/5), late [T/2, T). Only T >= 5 has fifths; at T = 10 a fifth is two steps,
# so T = 10's figures are dominated by step-to-step noise (the table shows how much, on IID clients).
DRIFT_GRADIP_T = tuple(t for t in grid.DRIFT_T if t >= 5)
ROUND_DETECTOR = {"quiet_factor": 0.25, "rho_later": 2.0, "rho_quiet": 0.5}


def gradip_records(cell: Cell) -> list[dict[str, Any]] | None:
    """The cell's GradIP records: from its cache, else from its run folder (then added to the cache)."""
    path = grid.CELLS / f"{cell.key}.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if "gradip" not in result:
        log = grid.RUNS / cell.key / "gradip.jsonl"
        if not log.exists():
            return None
        result["gradip"] = [json.loads(line) for line in log.read_text().splitlines() if line]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
    return result["gradip"]


def round_decays(task: str, lr: float, t: int, skew: str, seeds) -> list[dict[str, Any]]:
    """Every whole round (T steps) of one claim-2d Meerkat cell group, per (seed, round, client): its |GradIP|
    decay and whether the round-scaled detector (``ROUND_DETECTOR``) flags it.

    A round cut short, or one whose early or late mean is 0 or not finite (no ratio to take), is left out.
    """
    import numpy as np

    from meerkat_fl.vp import detection_signals

    fifth, rows = t // 5, []
    for seed in seeds:
        for record in gradip_records(Cell(task, "meerkat", f"drift-T{t}-{skew}", lr, seed, "test")) or []:
            values = np.abs(np.asarray(record["gradip"], dtype=np.float64))
            if len(values) != t or not np.isfinite(values).all():
                continue
            early, late = float(values[:fifth].mean()), float(values[-fifth:].mean())
            if early == 0 or late == 0:
                continue
            signals = detection_signals(values, (0, fifth), (t // 2, t), **ROUND_DETECTOR)
            rows.append({"seed": seed, "round": record["round"], "client_id": record["client_id"],
                         "decay": early / late, "flagged": signals.flagged})
    return rows


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive's score > a negative's), ties counting half (the Mann-Whitney AUC); NaN when one side is
    empty. Written out: a few hundred pairs, not worth a scipy dependency."""
    if not positive or not negative:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def drift_gradip(data: dict[str, Any], tasks) -> dict[str, Any]:
    """Claim 2d's GradIP within a round, per task and T: each partition's client-round decays (the seeds they
    came from), the share decayed 2x, the share the round-scaled detector flags, and how well decay tells a
    Non-IID client-round from an IID one (AUC)."""
    out: dict[str, Any] = {}
    for task in tasks:
        lr = data["lrs"].get(task, {}).get("meerkat")
        for t in DRIFT_GRADIP_T:
            groups = {}
            for skew in grid.DRIFT_SKEWS:
                seeds = data["results"].get(f"{task}/meerkat/drift-T{t}-{skew}", {}).get("seeds", [])
                rows = round_decays(task, lr, t, skew, seeds) if lr and seeds else []
                if rows:
                    decays = sorted(r["decay"] for r in rows)
                    groups[skew] = {"seeds": sorted({r["seed"] for r in rows}), "client_rounds": len(rows),
                                    "median_decay": statistics.median(decays),
                                    "decayed_2x": sum(d >= 2 for d in decays) / len(rows),
                                    "flagged": sum(r["flagged"] for r in rows) / len(rows),
                                    "decays": decays}
            for skew, group in groups.items():
                if skew != "iid" and "iid" in groups:
                    group["auc_vs_iid"] = auc(group["decays"], groups["iid"]["decays"])
            if groups:
                out[f"{task}/T{t}"] = groups
    return out


def drift_gradip_lines(summary: dict[str, Any]) -> list[str]:
    """The within-round GradIP table under claim 2d (nothing when no T >= 5 cell is cached)."""
    if not summary:
        return []
    lines = [("GradIP within a round (Meerkat; a client's T consecutive local steps between syncs): the decay is the "
              "mean |GradIP| of the round's first fifth over its last fifth; flagged is benchmarks/vp.py's detector "
              "(2x decay, half the late steps below 0.25x the early mean) on windows scaled to the round; AUC is the "
              "chance that a Non-IID client-round decays more than an IID one (0.5: indistinguishable). At T=10 a "
              "fifth is two steps: read its IID row as the noise level."), "",
             "| task | T | partition | seeds | client-rounds | median decay | decayed >= 2x | flagged | AUC vs IID |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, groups in summary.items():
        task, t = key.split("/")
        for skew, g in groups.items():
            score = "-" if "auc_vs_iid" not in g else f"{g['auc_vs_iid']:.2f}"
            lines.append(f"| {task} | {t[1:]} | {skew} | {','.join(map(str, g['seeds']))} | {g['client_rounds']} "
                         f"| {g['median_decay']:.2f} | {g['decayed_2x']:.0%} | {g['flagged']:.0%} | {score} |")
    return [*lines, ""]


def plot_drift_gradip(data: dict[str, Any], summary: dict[str, Any], out: Path) -> Path | None:
    """Claim 2d's phenomenon: |GradIP| against the local step within a round (geometric mean over every seed,
    round and client that ``round_decays`` keeps), one panel per task and T, one line per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not summary:
        return None
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4), squeeze=False)
    for ax, (key, groups) in zip(axes[0], summary.items()):
        task, t = key.split("/")
        lr, steps = data["lrs"][task]["meerkat"], int(t[1:])
        for skew, group in groups.items():
            kept = {(r["seed"], r["round"], r["client_id"]) for r in round_decays(task, lr, steps, skew, group["seeds"])}
            rows = [np.abs(np.asarray(r["gradip"], dtype=np.float64)) for seed in group["seeds"]
                    for r in gradip_records(Cell(task, "meerkat", f"drift-{t}-{skew}", lr, seed, "test")) or []
                    if (seed, r["round"], r["client_id"]) in kept]
            curve = np.exp(np.log(np.maximum(np.stack(rows), 1e-300)).mean(axis=0))  # a 0 step
            ax.plot(np.arange(1, steps + 1), curve, color=f"C{list(grid.DRIFT_SKEWS).index(skew)}",  # one per skew
                    label=f"{skew} ({len(rows)} client-rounds, median decay {group['median_decay']:.1f}x)")
        ax.set(title=f"{task}, T={steps}: Meerkat, {grid.DRIFT_LOCAL_STEPS} local steps per client",
               xlabel="local step within the round", ylabel="|GradIP| (geometric mean)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_gradip(data: dict[str, Any], tasks, out: Path) -> Path | None:
    """|GradIP| per client vs its local step, Meerkat's base cells (every seed), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from meerkat_fl.vp import trajectories_from_records

    panels = []
    for task in tasks:
        lr = data["lrs"].get(task, {}).get("meerkat")
        runs = [gradip_records(Cell(task, "meerkat", "base", lr, seed, "test")) for seed in grid.SEEDS] if lr else []
        if any(runs):
            panels.append((task, [r for r in runs if r]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (task, runs) in zip(axes[0], panels):
        for seed, records in enumerate(runs):
            for trajectory in trajectories_from_records(records).values():
                magnitude = np.abs(trajectory)
                ax.plot(np.arange(1, len(magnitude) + 1), np.where(magnitude > 0, magnitude, np.nan),
                        color=f"C{seed}", alpha=0.5, lw=0.9)
        ax.set(title=f"{task}: Meerkat, Dirichlet 0.5 (colour = seed, line = client)", xlabel="local step of the client",
               ylabel="|GradIP|", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
