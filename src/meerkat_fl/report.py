"""Plots and tables from run folders (matplotlib only here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.rundir import EVAL, FINAL, ZERO_SHOT, RunDir, primary_metric, read_metric


def save_figure(fig, out: str | Path) -> Path:
    """Write a figure as PNG (creating the folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: str | Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(label, metric rows, summary) of a run folder; label is the method and the folder name.

    The summary always names its `primary_metric` (read from the task for old or unfinished runs) and
    carries the zero-shot metrics of an unfinished run.
    """
    run = RunDir(path)
    if not (run.path / "metrics.jsonl").exists():
        raise ConfigError(f"{path}: not a run folder (no metrics.jsonl)")
    summary = run.read_json("summary.json") if (run.path / "summary.json").exists() else {}
    zero = run.read_json("zero_shot.json") if (run.path / "zero_shot.json").exists() else {}
    summary = {**zero, **summary}
    if "primary_metric" not in summary:
        task = None if "task" in summary else _config_task(run)
        summary["primary_metric"] = primary_metric(summary, task)
    if not isinstance(summary["primary_metric"], str):
        raise DataError(f"{path}: summary.json's primary_metric must be a metric name, got "
                        f"{summary['primary_metric']!r}: the file is damaged")
    label = summary.get("method", run.path.name)
    return label, run.read_metrics(), summary


def _config_task(run: RunDir) -> str:
    from meerkat_fl.config import load

    return load(run.config_path).task.name


def plot_runs(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """One PNG: the primary metric vs round (left) and vs cumulative bytes up+down (right, log x) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = set()
    for path in paths:
        label, rows, summary = load_run(path)
        metric = summary["primary_metric"]
        shown.add(metric)
        zero = read_metric(summary, ZERO_SHOT, metric)
        rounds, bytes_, scores = ([0], [1.0], [zero]) if _is_number(zero) else ([], [], [])
        cumulative = 0
        for row in rows:
            cumulative += row.get("bytes_up", 0) + row.get("bytes_down", 0)
            score = read_metric(row, EVAL, metric)
            if score is not None and "round" in row:  # the reader checked both are numbers
                rounds.append(row["round"])
                bytes_.append(max(cumulative, 1))
                scores.append(score)
        ax_round.plot(rounds, scores, marker="o", label=label)
        ax_bytes.plot(bytes_, scores, marker="o", label=label)
    ax_round.set_xlabel("round")
    ax_bytes.set_xlabel("cumulative bytes (up + down, all clients)")
    ax_bytes.set_xscale("log")
    for ax in (ax_round, ax_bytes):
        ax.set_ylabel("eval " + " / ".join(sorted(shown)))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def comparison_table(paths: Sequence[str | Path]) -> str:
    """A Markdown table of the runs' summaries (each run's primary metric, zero-shot and final)."""
    lines = ["| method | metric | zero-shot | final | bytes up/round | bytes down/round | wall s |",
             "|---|---|---|---|---|---|---|"]
    for path in paths:
        label, _, s = load_run(path)
        fmt = lambda v, spec: format(v, spec) if _is_number(v) else "-"
        metric = s["primary_metric"]
        lines.append(f"| {label} | {metric} | {fmt(read_metric(s, ZERO_SHOT, metric), '.3f')} "
                     f"| {fmt(read_metric(s, FINAL, metric), '.3f')} "
                     f"| {fmt(s.get('bytes_up_per_round'), ',.0f')} | {fmt(s.get('bytes_down_per_round'), ',.0f')} "
                     f"| {fmt(s.get('wall_seconds'), '.0f')} |")
    return "\n".join(lines)


def gradip_analysis(path: str | Path) -> dict[str, Any]:
    """A run folder's GradIP trajectories and Meerkat-vp detection (with the run's own [vp] settings).

    Per client: true partition kind, trajectory, signals on its calibration trajectory (what the strategy
    decides at its first check) and, for meerkat_vp runs, whether it was stopped at the end. Precision and
    recall count "extreme" partition clients as positives.
    """
    import math

    from meerkat_fl.config import load, method_name
    from meerkat_fl.partition import load_partition
    from meerkat_fl.vp import GRADIP_LOG, DetectionSettings, precision_recall, trajectories_from_records

    run = RunDir(path)
    if not (run.path / GRADIP_LOG).exists():
        raise ConfigError(f"{path}: no {GRADIP_LOG} (GradIP needs a sensitive mask and vp.log_gradip = true)")
    cfg = load(run.config_path)
    vp = cfg.vp
    settings = DetectionSettings.from_vp(vp)
    kinds = load_partition(run.path / "partition.json").kinds
    try:
        trajectories = trajectories_from_records(run.read_metrics(GRADIP_LOG))
    except (KeyError, TypeError, ValueError) as exc:  # a line without its fields, or with fields of other types
        raise DataError(f"{run.path / GRADIP_LOG}: damaged ({type(exc).__name__}: {exc})") from None
    rows = run.read_metrics()
    stopped = rows[-1].get("vp_stopped") if rows and "vp_stopped" in rows[-1] else None
    clients = []
    for cid, kind in enumerate(kinds):
        trajectory = trajectories.get(cid)
        signals = settings.first_check(trajectory) if trajectory is not None else None
        calibrated = trajectory is not None and len(trajectory) >= settings.calibration_steps
        clients.append({
            "client_id": cid, "kind": kind, "steps": 0 if trajectory is None else len(trajectory),
            "trajectory": trajectory, "calibrated": calibrated,
            "rho_later": math.nan if signals is None else signals.rho_later,
            "rho_quiet": math.nan if signals is None else signals.rho_quiet,
            "flagged": bool(signals is not None and calibrated and signals.flagged),
            "stopped": None if stopped is None else cid in stopped,
        })
    extreme = [c["client_id"] for c in clients if c["kind"] == "extreme"]
    precision, recall = precision_recall([c["client_id"] for c in clients if c["flagged"]], extreme)
    return {"clients": clients, "precision": precision, "recall": recall, "settings": settings,
            "method": method_name(cfg)}


def detection_table(analysis: dict[str, Any]) -> str:
    """A Markdown table: client, true kind, steps, rho_later, rho_quiet, flagged (and stopped), then precision
    and recall of the flags against the "extreme" clients."""
    import math

    def fmt(value: float | None) -> str:
        if value is None or math.isnan(value):
            return "-"
        return "inf" if math.isinf(value) else f"{value:.2f}"

    with_stopped = any(c["stopped"] is not None for c in analysis["clients"])
    head = "| client | true kind | steps | rho_later | rho_quiet | flagged |" + (" stopped |" if with_stopped else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in analysis["clients"]:
        flagged = "yes" if c["flagged"] else ("no" if c["calibrated"] else "not calibrated")
        line = (f"| {c['client_id']} | {c['kind']} | {c['steps']} | {fmt(c['rho_later'])} | {fmt(c['rho_quiet'])} "
                f"| {flagged} |")
        lines.append(line + (f" {'yes' if c['stopped'] else 'no'} |" if with_stopped else ""))
    s = analysis["settings"]
    lines.append("")
    lines.append(f"precision {fmt(analysis['precision'])}, recall {fmt(analysis['recall'])} "
                 f"(calibration {s.calibration_steps} steps, early {list(s.early_window)}, late {list(s.late_window)}, "
                 f"quiet < {s.quiet_factor} x early mean, flag if rho_later >= {s.rho_later} "
                 f"and rho_quiet >= {s.rho_quiet})")
    return "\n".join(lines)


def plot_gradip(analysis: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    """One PNG: |GradIP| per client vs the client's local step (log y), red for extreme clients, blue for
    Dirichlet/IID ones; the detection windows of the first check are shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for c in analysis["clients"]:
        if c["trajectory"] is None:
            continue
        extreme = c["kind"] == "extreme"
        label = "extreme (single label)" if extreme else f"{c['kind']}"
        magnitude = np.abs(c["trajectory"])
        ax.plot(np.arange(len(magnitude)), np.where(magnitude > 0, magnitude, np.nan), lw=1.2 if extreme else 0.8,
                color="tab:red" if extreme else "tab:blue", alpha=0.9 if extreme else 0.6,
                label=None if label in seen else label)
        seen.add(label)
    s = analysis["settings"]
    ax.axvspan(*s.early_window, color="0.85", zorder=0, label="early window")
    ax.axvspan(*s.late_window, color="0.93", zorder=0, label="late window (first check)")
    ax.set_yscale("log")
    ax.set_xlabel("local step of the client")
    ax.set_ylabel("|GradIP|")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"GradIP trajectories ({analysis['method']})")
    return save_figure(fig, out)
