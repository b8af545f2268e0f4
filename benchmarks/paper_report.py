"""The paper grid's report: verdicts on the claims, the markdown tables and the plots.

Everything here reads what ``paper_cells.collect`` returns (per-(task, method, setting) seed lists, the tuned
lrs, the tuning grid and the checks) and runs nothing. A claim holds when the mean difference exceeds twice its
standard error, given both unpaired (Welch) and paired by seed; every verdict states its detectable difference
(twice that standard error, the smallest the design could call), and an inconclusive one whose ±2 SE interval
lies within ±``USEFUL_DIFFERENCE`` says there is no effect larger than that; ``report`` writes one table and its verdicts per
claim, then the tuning grid and the checks beyond it; ``plot`` draws accuracy against rounds and bytes. What the
cells' GradIP logs show (claim 2d's within-round decay, the per-client plots) is ``paper_gradip``'s.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import paper_grid as grid  # settings and paths read as grid.X, so a test patching paper_grid is seen here
from paper_gradip import drift_gradip, drift_gradip_lines

# [choice] The smallest accuracy difference worth deciding: 0.03, 6 of the 200 test examples. A smaller one is
# below a single method's seed-to-seed spread here (std 0.01-0.08 in the tables), so it would not change which
# method, mask or sync frequency one picks at this scale.
USEFUL_DIFFERENCE = 0.03


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def welch_difference(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """mean(a) - mean(b) and its standard error, unpaired (Welch); None with fewer than 3 seeds on a side."""
    if len(a) < 3 or len(b) < 3:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.fmean(a) - statistics.fmean(b), se


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float] | None:
    """The mean of the per-seed differences a[seed] - b[seed] and its standard error; None with fewer than 3
    shared seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 3:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def detectable(se: float) -> float:
    """The smallest difference the design could have called (holds or does not hold): twice its standard error."""
    return 2 * se


def _rule(diff: float, se: float) -> str:
    size = f"{diff:+.3f} ± {se:.3f}, detectable {detectable(se):.3f}"
    if diff > detectable(se):
        return f"holds ({size})"
    if diff < -detectable(se):
        return f"does not hold ({size})"
    # [choice] "no effect larger than" needs the whole ±2 SE interval inside ±USEFUL_DIFFERENCE, not only a
    # detectable size below it: a difference of +0.025 with a detectable 0.028 does not rule out 0.05.
    if abs(diff) + detectable(se) < USEFUL_DIFFERENCE:
        return f"no effect larger than {USEFUL_DIFFERENCE:g} ({size})"
    return f"inconclusive ({size})"


def devices_line(results: Iterable[dict[str, Any]], unrecorded: str) -> str:
    """A line counting cells per device when they ran on more than one ("" otherwise). Cells written before
    the device was recorded count as ``unrecorded`` (they all ran on CPUs); a cell resumed on another device
    counts under its devices in order ("x86_64 then NVIDIA H200")."""
    counts = Counter(" then ".join(result["devices"]) if result.get("devices") else result.get("device", unrecorded)
                     for result in results)
    if len(counts) <= 1:
        return ""
    return ("Cells by device: " + ", ".join(f"{n} on {device}" for device, n in sorted(counts.items()))
            + " (a cell's JSON names its device; CPU and CUDA float32 scalars differ by about 1e-3 relative).")


def verdict(a: list[float], b: list[float]) -> str:
    """holds when mean(a) - mean(b) exceeds twice its standard error (Welch, unpaired), does not hold when it
    is below minus twice; otherwise no effect larger than USEFUL_DIFFERENCE when the difference's ±2 SE interval
    lies inside ±USEFUL_DIFFERENCE, else inconclusive (and with fewer than 3 seeds each). Each verdict gives the
    difference, its standard error and the detectable difference."""
    found = welch_difference(a, b)
    return "inconclusive (fewer than 3 seeds)" if found is None else _rule(*found)


def paired_verdict(a: dict[int, float], b: dict[int, float]) -> str:
    """The same rule on the per-seed differences a[seed] - b[seed] (mean ± its standard error).

    Pairing is by design, not by chance: a seed fixes the training subsample, the partition, the sampled
    clients and the test subsample for every method, so the seed-to-seed spread of the test subsample (zero-shot
    moves 0.625-0.665 on AG News) cancels. Identical differences on every seed have a zero standard error.
    """
    found = paired_difference(a, b)
    return "inconclusive (fewer than 3 shared seeds)" if found is None else _rule(*found)


def bytes_to_beat(curves: list[list[list[float]]], target: float) -> tuple[int, float] | None:
    """(round, cumulative bytes up + down) of the first evaluation whose accuracy, both as means over seeds,
    is above ``target``; None when the curve never gets there (or the seeds' evaluation rounds differ)."""
    if not curves or any([p[0] for p in c] != [p[0] for p in curves[0]] for c in curves):
        return None
    for i, point in enumerate(curves[0]):
        if statistics.fmean(c[i][2] for c in curves) > target + 1e-9:
            return int(point[0]), statistics.fmean(c[i][1] for c in curves)
    return None


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:  # one seed has no spread to show
        return f"{values[0]:.3f} (n=1)"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f} (n={len(values)})"


def report(data: dict[str, Any], tasks, claims, within: dict[str, Any] | None = None) -> str:
    """The markdown tables and verdicts; ``within`` is ``drift_gradip``'s summary when the caller has it."""
    res = data["results"]

    def acc(task: str, method: str, setting: str = "base") -> list[float]:
        return res.get(f"{task}/{method}/{setting}", {}).get("accuracy", [])

    def by_seed(task: str, method: str, setting: str = "base") -> dict[int, float]:
        r = res.get(f"{task}/{method}/{setting}", {})
        return dict(zip(r.get("seeds", []), r.get("accuracy", [])))

    def compare(task: str, a: str, b: str) -> str:
        paired = paired_verdict(by_seed(task, a), by_seed(task, b))
        return f"{verdict(acc(task, a), acc(task, b))}; paired by seed: {paired}"

    def below_ceiling(task: str, setting: str = "base") -> str:
        """How far Meerkat lands below the first-order ceiling on the same mask, as a gap, not a verdict."""
        ours, ceiling = by_seed(task, "meerkat", setting), by_seed(task, grid.CEILING, setting)
        welch = welch_difference(list(ours.values()), list(ceiling.values()))
        paired = paired_difference(ours, ceiling)
        return (f"meerkat minus the first-order ceiling ({grid.CEILING}): " + (
            "fewer than 3 seeds" if welch is None else f"{welch[0]:+.3f} ± {welch[1]:.3f} (Welch)") + (
            "" if paired is None else f", {paired[0]:+.3f} ± {paired[1]:.3f} (paired by seed)"))

    legend = (f"Verdicts give the difference ± its standard error (Welch, then paired by seed) and the detectable "
              f"difference, 2 SE: the smallest the design could call. Inconclusive becomes \"no effect larger than "
              f"{USEFUL_DIFFERENCE:g}\" when the ±2 SE interval lies within ±{USEFUL_DIFFERENCE:g}.")
    lines = [legend, ""]
    for claim in claims:
        methods, settings, statement = grid.CLAIMS[claim]
        lines += [f"### Claim {claim}: {statement}", ""]
        claim_tasks = [t for t in tasks if claim in grid.TASK_CLAIMS.get(t, claims)]
        if claim == "2d":
            lines += drift_report(res, claim_tasks, methods, by_seed)
            lines += drift_gradip_lines(drift_gradip(data, claim_tasks) if within is None else within)
            continue
        if claim == "2w":
            lines += weighting_report(claim_tasks, methods, by_seed)
            continue
        head = ["task"] + [f"{m} {s}" if len(settings) > 1 else m for m in methods for s in settings]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for task in claim_tasks:
            zs = next((r["zero_shot"] for r in res.values() if r["task"] == task), [])
            row = [f"{task} (zero-shot {statistics.fmean(zs):.3f})" if zs else task]
            row += [fmt(acc(task, m, s)) for m in methods for s in settings]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for task in claim_tasks:
            if claim in ("1", "4"):
                others = [m for m in methods[1:] if m != grid.CEILING] if claim == "1" else ["random"]
                for other in others:
                    lines.append(f"- {task}: meerkat vs {other}: {compare(task, 'meerkat', other)}")
                if grid.CEILING in methods and acc(task, grid.CEILING):  # a ceiling, not a competitor: no verdict
                    lines.append(f"- {task}: {below_ceiling(task)}")
                if claim == "4":
                    same = compare(task, "meerkat", "meerkat_taskmask")
                    lines.append(f"- {task}: wikitext mask minus task mask: {same} (claim: no difference)")
            elif claim == "2":  # each method's own gaps: Meerkat's, and the first-order ceiling's beside them
                for method, skew in ((m, skew) for m in methods for skew in ("dirichlet", "pathological")):
                    gaps = {
                        t: {s: iid[s] - d for s, d in by_seed(task, method, f"T{t}-{skew}").items() if s in iid}
                        for t in (1, 10) for iid in [by_seed(task, method, f"T{t}-iid")]
                    }
                    if method != "meerkat" and not any(gaps.values()):
                        continue  # a ceiling not run yet adds no line
                    name = "" if method == "meerkat" else f" / {method}"
                    lines.append(f"- {task}{name}: IID minus {skew} gap, T=1: {fmt(list(gaps[1].values()))}; "
                                 f"T=10: {fmt(list(gaps[10].values()))}; T=10 gap minus T=1 gap: "
                                 f"{verdict(list(gaps[10].values()), list(gaps[1].values()))}; "
                                 f"paired by seed: {paired_verdict(gaps[10], gaps[1])}")
            elif claim == "3":
                means = {m: statistics.fmean(acc(task, m)) for m in methods if acc(task, m)}
                if means:
                    best = max(means, key=means.get)
                    lines.append(f"- {task}: best density: {best}")
                    for other in (m for m in methods if m != best and m in means):
                        lines.append(f"- {task}: {best} vs {other}: {compare(task, best, other)}")
            elif claim == "5":
                for m in methods:
                    r = res.get(f"{task}/{m}/base")
                    if r:
                        lines.append(f"- {task}: {m}: {r['bytes_per_round']:,.0f} bytes/round, accuracy {fmt(r['accuracy'])}")
                meerkat, dense = res.get(f"{task}/meerkat/base"), res.get(f"{task}/full_fedzo/base")
                if meerkat and dense:
                    lines.append(f"- {task}: bytes per round, full_fedzo / meerkat: "
                                 f"{dense['bytes_per_round'] / meerkat['bytes_per_round']:,.0f}x")
                    target = statistics.fmean(dense["accuracy"])
                    spent = statistics.fmean(c[-1][1] for c in dense["curves"])
                    beat = bytes_to_beat(meerkat["curves"], target)
                    lines.append(
                        f"- {task}: Full-FedZO ends at {target:.3f} (zero-shot {statistics.fmean(dense['zero_shot']):.3f})"
                        f" after {spent:,.0f} bytes; " + (
                            f"meerkat is above that at round {beat[0]}, after {beat[1]:,.0f} bytes "
                            f"({spent / beat[1]:,.0f}x fewer)" if beat else "meerkat never gets above it"))
            elif claim == "6":
                lines.append(f"- {task}: fedmezo vs full_fedzo: {compare(task, 'fedmezo', 'full_fedzo')}")
        lines.append("")
    lines += ["### Tuning grid (validation accuracy, seed 0)", ""]
    for task, methods in data["tuning_grid"].items():
        for method, points in methods.items():
            cells = ", ".join(f"lr {lr}: {'-' if v is None else f'{v:.3f}'}" for lr, v in points.items())
            lines.append(f"- {task} / {method}: {cells}; chosen {data['lrs'].get(task, {}).get(method)}")
    if data.get("eps_check"):
        lines += ["", "### Checks beyond the grids (validation accuracy, seed 0)", "",
                  "Epsilon: Meerkat at its tuned lr. Dense: Full-FedZO one x4 step above its lr grid.", ""]
        for task, row in data["eps_check"].items():
            cells = ", ".join(f"eps {e}: {'-' if row.get(e) is None else f'{row[e]:.3f}'}"
                              for e in ("1e-4", "1e-3", "1e-2"))
            lines.append(f"- {task} (lr {row['lr']}): {cells}")
            above = row.get("full_fedzo_above_grid")
            lines.append(f"- {task}: Full-FedZO at lr {grid.DENSE_CHECK_LR:g}, above its grid: "
                         f"{'-' if above is None else f'{above:.3f}'} (grid: {data['tuning_grid'][task].get('full_fedzo')})")
    return "\n".join(lines) + "\n"


def weighting_report(tasks, methods, by_seed) -> list[str]:
    """Claim 2w: each Dirichlet 0.1 drift cell run again with every sampled client weighted equally, beside
    claim 2d's cell of the same seed (weighted by shard size), per seed, and the paired difference per T. Claim
    2d's IID cell of the seed stands beside them: IID shards are equal, so its weights are uniform either way."""
    lines = ["| task | method | T | seed | IID (2d) | by shard size (2d) | uniform | uniform minus by size |",
             "|" + "---|" * 8]
    verdicts = []

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for task in tasks:
        for method in methods:
            for t in grid.DRIFT_T:
                iid = by_seed(task, method, f"drift-T{t}-iid")
                sized = by_seed(task, method, f"drift-T{t}-dirichlet01")
                uniform = by_seed(task, method, f"drift-T{t}-dirichlet01-uniform")
                for seed in sorted(uniform):
                    before = sized.get(seed)
                    lines.append(f"| {task} | {method} | {t} | {seed} | {cell(iid.get(seed))} | {cell(before)} | "
                                 f"{uniform[seed]:.3f} | {'-' if before is None else f'{uniform[seed] - before:+.3f}'} |")
                if uniform:
                    verdicts.append(f"- {task} / {method}: T={t}, uniform minus by shard size: "
                                    f"paired by seed: {paired_verdict(uniform, sized)}")
    return [*lines, "", *verdicts, ""]


def drift_report(res: dict[str, Any], tasks, methods, by_seed) -> list[str]:
    """Claim 2d's table (one row per task, method and T: accuracy per partition and the bytes one run moved)
    and its verdicts: the IID minus Non-IID gap at each T, and whether T=10's and T=50's gaps exceed T=1's."""
    skews = list(grid.DRIFT_SKEWS)
    lines = ["| task | method | T | " + " | ".join(skews) + " | bytes per run (up + down) |",
             "|" + "---|" * (len(skews) + 4)]
    for task in tasks:
        for method in methods:
            for t in grid.DRIFT_T:
                cells = [res.get(f"{task}/{method}/drift-T{t}-{skew}") for skew in skews]
                spent = [statistics.fmean(c[-1][1] for c in r["curves"]) for r in cells if r and all(r["curves"])]
                lines.append(f"| {task} | {method} | {t} | " + " | ".join(fmt(r["accuracy"]) if r else "-" for r in cells)
                             + f" | {f'{statistics.fmean(spent):,.0f}' if spent else '-'} |")
    lines.append("")
    for task in tasks:
        for method in methods:
            for skew in skews[1:]:
                gaps = {}
                for t in grid.DRIFT_T:
                    iid = by_seed(task, method, f"drift-T{t}-iid")
                    gaps[t] = {s: iid[s] - a for s, a in by_seed(task, method, f"drift-T{t}-{skew}").items() if s in iid}
                if not any(gaps.values()):
                    continue
                each = "; ".join(f"T={t}: {fmt(list(g.values()))}" for t, g in gaps.items())
                lines.append(f"- {task} / {method}: IID minus {skew} gap, {each}")
                for t in grid.DRIFT_T[1:]:
                    lines.append(f"- {task} / {method} / {skew}: T={t} gap minus T=1 gap: "
                                 f"{verdict(list(gaps[t].values()), list(gaps[1].values()))}; "
                                 f"paired by seed: {paired_verdict(gaps[t], gaps[1])}")
    lines.append("")
    return lines


def plot(data: dict[str, Any], tasks, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in data["results"].values() if r["setting"] == "base"]
    if not res:
        return None
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for r in (r for r in res if r["task"] == task):
            rounds = [[p[0] for p in c] for c in r["curves"]]
            if not rounds or any(x != rounds[0] for x in rounds):
                continue
            accs = [statistics.fmean(c[i][2] for c in r["curves"]) for i in range(len(rounds[0]))]
            nbytes = [statistics.fmean(c[i][1] for c in r["curves"]) for i in range(len(rounds[0]))]
            zero = statistics.fmean(r["zero_shot"])
            row[0].plot([0, *rounds[0]], [zero, *accs], marker="o", label=r["method"])
            row[1].plot([1, *nbytes], [zero, *accs], marker="o", label=r["method"])
        row[0].set(xlabel="round", ylabel=f"{task} test accuracy (mean over seeds)")
        row[1].set(xlabel="cumulative bytes (up + down)", xscale="log")
        for ax in row:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a task with no cells yet has nothing to label
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
