"""The main job: Meerkat vs Full-FedZO on the embedded model, same T, rounds and forward passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meerkat_fl import config
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.progress import Progress
from meerkat_fl.report import comparison_table, plot_runs

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.toml"
# Full-FedZO differs from Meerkat only in its mask (dense) and its lr (dense ZO needs a far smaller one).
FULL_FEDZO = ["mask.kind=dense", "zo.lr=2e-6"]


def run_demo(out: str | Path, overrides: list[str] = (), progress: Progress = True) -> dict[str, Any]:
    """Run both methods into ``out/meerkat`` and ``out/full_fedzo``; write ``out/demo.png`` and a table."""
    out = Path(out)
    base = config.validate(config.resolve_environment(config.load(DEMO_CONFIG, list(overrides))))
    summaries, first = {}, None
    for name, extra in (("meerkat", []), ("full_fedzo", FULL_FEDZO)):
        cfg = config.validate(config.apply_overrides(base, [*extra, *overrides]))
        # The zero-shot model is the same for both (same model, task and test rows): evaluated once [choice:
        # saves a full evaluation of the test rows; the second run's zero_shot.json names where it came from].
        shared = first is not None and (cfg.model, cfg.task) == (first[0].model, first[0].task)
        summaries[name] = simulate(cfg, out / name, progress=progress, zero_shot_from=first[1] if shared else None)
        first = first or (cfg, out / name)
    runs = [out / name for name in summaries]
    plot = plot_runs(runs, out / "demo.png", title=f"{base.task.name}: Meerkat vs Full-FedZO, "
                     f"{base.fed.num_clients} clients, Dirichlet alpha={base.fed.alpha}, T={base.fed.local_steps}")
    table = comparison_table(runs)
    (out / "demo.md").write_text(table + "\n")
    return {"summaries": summaries, "table": table, "plot": str(plot)}
