"""Plots and tables from run folders (matplotlib only here)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meerkat_fl.errors import ConfigError
from meerkat_fl.rundir import RunDir


def load_run(path: str | Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(label, metric rows, summary) of a run folder; label is the method and the folder name."""
    run = RunDir(path)
    if not (run.path / "metrics.jsonl").exists():
        raise ConfigError(f"{path}: not a run folder (no metrics.jsonl)")
    summary = run.read_json("summary.json") if (run.path / "summary.json").exists() else {}
    zero = run.read_json("zero_shot.json") if (run.path / "zero_shot.json").exists() else {}
    if "zero_shot_accuracy" not in summary and zero:
        summary["zero_shot_accuracy"] = zero.get("zero_shot_accuracy")
    label = summary.get("method", run.path.name)
    return label, run.read_metrics(), summary


def plot_runs(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """One PNG: eval accuracy vs round (left) and vs cumulative bytes up+down (right, log x) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in paths:
        label, rows, summary = load_run(path)
        zero = summary.get("zero_shot_accuracy")
        rounds, bytes_, accs = ([0], [1.0], [zero]) if zero is not None else ([], [], [])
        cumulative = 0
        for row in rows:
            cumulative += row.get("bytes_up", 0) + row.get("bytes_down", 0)
            if row.get("eval_accuracy") is not None:
                rounds.append(row["round"])
                bytes_.append(max(cumulative, 1))
                accs.append(row["eval_accuracy"])
        ax_round.plot(rounds, accs, marker="o", label=label)
        ax_bytes.plot(bytes_, accs, marker="o", label=label)
    ax_round.set_xlabel("round")
    ax_bytes.set_xlabel("cumulative bytes (up + down, all clients)")
    ax_bytes.set_xscale("log")
    for ax in (ax_round, ax_bytes):
        ax.set_ylabel("eval accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def comparison_table(paths: Sequence[str | Path]) -> str:
    """A Markdown table of the runs' summaries."""
    lines = ["| method | zero-shot acc | final acc | bytes up/round | bytes down/round | wall s |",
             "|---|---|---|---|---|---|"]
    for path in paths:
        label, _, s = load_run(path)
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {label} | {fmt(s.get('zero_shot_accuracy'), '.3f')} | {fmt(s.get('final_eval_accuracy'), '.3f')} "
                     f"| {fmt(s.get('bytes_up_per_round'), ',.0f')} | {fmt(s.get('bytes_down_per_round'), ',.0f')} "
                     f"| {fmt(s.get('wall_seconds'), '.0f')} |")
    return "\n".join(lines)


def summaries_json(paths: Sequence[str | Path]) -> str:
    return json.dumps({str(p): load_run(p)[2] for p in paths}, indent=2)
