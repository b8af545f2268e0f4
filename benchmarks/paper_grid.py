"""The paper grid's definition: paths, the shared setting, tasks, methods, settings, claims and lr grids.

Everything here is data plus the two pure readings of it that the rest of the harness needs: a ``Cell`` (one
task, method, setting, lr, seed and split) with its cache key and its ``simulate`` overrides, and a method's lr
grid (built by ``meerkat_fl.tune``, the library's tuner, as is the choice of the tuned lr in ``paper_cells``). The
paths (cache, run folders, locks) live here too, the one place the cell runner and the report read
them from, so a test that moves them under a temporary folder patches this module only. No cell runs here
(``paper_cells``) and nothing is reported (``paper_report``); ``paper.py`` is the entry point.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from meerkat_fl.methods import scale_lr
from meerkat_fl.tune import VALIDATION, scale_grid

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CELLS = RESULTS / "paper" / "cells"
RUNS = REPO / "runs" / "paper"
LOCKS = RUNS / "locks"

# The shared setting (the demo's): 10 clients, Dirichlet alpha=0.5, 5 sampled per round, T=2, 8 rounds.
BASE = [
    "model.source='smollm2'", "task.train_size=2000", "task.eval_size=200", "task.max_length=48",
    "task.eval_batch_size=50", "task.validation_size=400", "zo.eps=1e-3", "zo.batch_size=8",
    "fed.num_clients=10", "fed.sample_count=5", "fed.rounds=8", "fed.local_steps=2", "fed.partition='dirichlet'",
    "fed.alpha=0.5", "fed.downlink='values'", "run.eval_every=4", "run.checkpoint_every=4",
    "fed.clip='none'",  # the paper's aggregation, as every cached cell ran (the robust clip came later)
    # the generator every cached cell was drawn with, pinned so a later default cannot change a cell's bits
    # (cell keys do not name the noise; re-running a cell must reproduce its cached result)
    "zo.noise_generator='torch_cpu'", "zo.noise='gaussian'",
]
# Where cells run: $MEERKAT_PAPER_DEVICE (cpu unless set, e.g. cuda). Not in a cell's key: a cell is the same
# experiment on any device, though not the same bits (float32 scalars on a CPU and on CUDA differ by about 1e-3
# relative, benchmarks/results/gpu_replay.json), so a cell re-run on another device reproduces its result
# statistically, not exactly. Each cell's JSON records its device (a resumed cell: the device that finished it),
# and the tables count the cells per device when they ran on more than one.
DEVICE = os.environ.get("MEERKAT_PAPER_DEVICE", "cpu")
TASKS = ("sst2", "ag_news")  # the default grid
EXTRA_TASKS = ("rte",)  # opt-in with --tasks: RTE's cells are not all run yet
# Per-task additions to BASE. RTE's premise + hypothesis prompts have a median of 67 tokens (48 would cut
# 79% of them from the left, most of the premise); 64 cuts about half of them by a few tokens, at 1.3x the
# cost of a 48-token forward.
TASK_OVERRIDES: dict[str, list[str]] = {"rte": ["task.max_length=64"]}
# Claims per task (all when absent). RTE, the third task, runs the mask claims only (1, 4, 5): its full grid
# would add ~6 hours of cells on 2 cores, and claims 2, 3 and 6 are answered on SST-2 and AG News.
TASK_CLAIMS: dict[str, tuple[str, ...]] = {"rte": ("1", "4", "5")}
SEEDS = (0, 1, 2)
# Every grid is centred on 5e-4 at density 1e-3, moved to the method's density (``scale_lr``). The grid's own
# centre, not the registry's presets: those are this grid's results, and a preset moved later must not rename
# (invalidate) the cached cells.
LR_CENTRE, LR_CENTRE_DENSITY, LR_FACTORS = 5e-4, 1e-3, (0.25, 1.0, 4.0)
LR_DIGITS = 3  # grid values keep the 3 significant digits a cell's name keeps (Cell.key: lr{:.3g})
LR_TIES = "smallest"  # equal validation scores: the smallest lr (``meerkat_fl.tune.best_index``'s rule)
# The magnitude and random masks' 3-point grids were flat (SST-2) or best at their top point by a validation
# example or two (AG News), so their grids go on upwards (x16 ... x1024, x16384 for random) until every task's
# best point is inside or the top points diverge: a baseline gets every chance to move. Added after the first
# grid's results, for the 1e-3 baselines of claim 1 only; Meerkat's grid has an interior optimum on every task.
# Claim 3's density variants peaked at a grid edge (1e-2 at its top on both tasks, 1e-4 at its bottom on AG
# News), so each gets one more point beyond that edge (x16 and x1/16).
METHOD_LR_FACTORS: dict[str, tuple[float, ...]] = {
    "magnitude": (*LR_FACTORS, 16.0, 64.0, 256.0, 1024.0),
    "random": (*LR_FACTORS, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0),  # AG News still climbed at x1024
    "meerkat_d1e-2": (*LR_FACTORS, 16.0), "meerkat_d1e-4": (1 / 16, *LR_FACTORS),
    # the first-order ceiling, centred on its own preset (LR_CENTRES); x64 added because AG News peaked at x16
    "fedavg_fo": (*LR_FACTORS, 16.0, 64.0)}

# method -> (overrides, density used to centre its lr grid, the method whose tuned lr it reuses or None)
METHODS: dict[str, tuple[list[str], float, str | None]] = {
    "meerkat": (["mask.kind='sensitive'", "mask.density=1e-3"], 1e-3, None),
    "full_fedzo": (["mask.kind='dense'", "zo.noise_cache='on'"], 1.0, None),  # same bits, 1/3 the noise draws
    "magnitude": (["mask.kind='magnitude'", "mask.density=1e-3"], 1e-3, None),
    "random": (["mask.kind='random'", "mask.density=1e-3"], 1e-3, None),
    "meerkat_d1e-4": (["mask.kind='sensitive'", "mask.density=1e-4"], 1e-4, None),
    "meerkat_d1e-2": (["mask.kind='sensitive'", "mask.density=1e-2"], 1e-2, None),
    "meerkat_taskmask": (["mask.kind='sensitive'", "mask.density=1e-3"], 1e-3, "meerkat"),
    "fedmezo": (["mask.kind='dense'", "zo.noise_cache='on'", "fed.strategy='fedmezo'"], 1.0, "full_fedzo"),
    # the first-order ceiling (issue 17, item 5): FedAvg of local SGD steps (backprop) on Meerkat's own mask, so
    # each ZO number has the same mask's first-order result beside it; its lr is fo.lr (``LR_KEYS``)
    "fedavg_fo": (["fed.strategy='fedavg_fo'", "mask.kind='sensitive'", "mask.density=1e-3"], 1.0, None),
}
# Not a competitor: the claims' verdicts leave it out; each table it is in gets its column and a
# "meerkat vs the first-order ceiling" line.
CEILING = "fedavg_fo"
LR_KEYS = {"fedavg_fo": "fo.lr"}  # the key a method's lr sets (the rest: zo.lr)
# A backprop lr is not a ZO lr moved by density: the ceiling's grid is centred on the registry's (untuned) SGD
# preset for the mask, 3e-3, with two more x4 steps up (a noise-free step can take a far larger lr than ZO's).
LR_CENTRES = {"fedavg_fo": 3e-3}

PATHOLOGICAL = ["fed.partition='pathological'", "fed.labels_per_client=1"]
# Settings beyond BASE; T x rounds is 20 local steps per sampled client in both sync frequencies.
SETTINGS = {
    "base": [],
    "T1-iid": ["fed.partition='iid'", "fed.local_steps=1", "fed.rounds=20", "run.eval_every=5"],
    "T10-iid": ["fed.partition='iid'", "fed.local_steps=10", "fed.rounds=2", "run.eval_every=1"],
    "T1-dirichlet": ["fed.local_steps=1", "fed.rounds=20", "run.eval_every=5"],
    "T10-dirichlet": ["fed.local_steps=10", "fed.rounds=2", "run.eval_every=1"],
    # extreme Non-IID: every client holds one label (Dirichlet 0.5 barely hurt at this budget)
    "T1-pathological": [*PATHOLOGICAL, "fed.local_steps=1", "fed.rounds=20", "run.eval_every=5"],
    "T10-pathological": [*PATHOLOGICAL, "fed.local_steps=10", "fed.rounds=2", "run.eval_every=1"],
    # the epsilon check: Meerkat at its tuned lr, on validation, with the perturbation scale moved x0.1 and x10
    "eps1e-4": ["zo.eps=1e-4"],
    "eps1e-2": ["zo.eps=1e-2"],
}
# Claim 2 with drift in it (issue 17, item 3): 100 local steps per sampled client, enough for a one-label client
# to fit its label (the fitting diagnostic: 25-50 centralised steps at 5e-4, batch 8), at T = 1, 10 and 50
# (100, 10 and 2 rounds: equal forward passes per client), IID against one label per client and Dirichlet 0.1,
# evaluated on the whole test split (DRIFT_EVAL_SIZE). New setting names, so no cached cell changes meaning.
DRIFT_LOCAL_STEPS = 100
DRIFT_T = (1, 10, 50)
DRIFT_SKEWS: dict[str, list[str]] = {"iid": ["fed.partition='iid'"], "dirichlet01": ["fed.alpha=0.1"],
                                     "pathological": PATHOLOGICAL}
DRIFT_EVAL_SIZE = {"sst2": 872, "ag_news": 1000, "rte": 277}  # SST-2's dev, a fixed-size AG News sample, RTE's dev
for _t in DRIFT_T:
    _rounds = DRIFT_LOCAL_STEPS // _t
    for _skew, _extra in DRIFT_SKEWS.items():
        SETTINGS[f"drift-T{_t}-{_skew}"] = [*_extra, f"fed.local_steps={_t}", f"fed.rounds={_rounds}",
                                            f"run.eval_every={max(1, _rounds // 4)}",
                                            f"run.checkpoint_every={max(1, _rounds // 10)}"]
DRIFT_SETTINGS = [f"drift-T{t}-{skew}" for t in DRIFT_T for skew in DRIFT_SKEWS]
# Claim 2d's Dirichlet 0.1 cells with each sampled client weighted equally (``fed.weighting = "uniform"``) instead
# of by shard size: on AG News seed 0 four large one-label shards took 80% or more of a round's replay weight and
# two rare-sync runs collapsed to near one class (BENCHMARKS.md). The same cells but for the weighting.
# Rarest sync first, where seed 0 collapsed furthest: a run cut short has the most telling cells.
WEIGHTING_SETTINGS = [f"drift-T{t}-dirichlet01-uniform" for t in reversed(DRIFT_T)]
# what claim 2w compares them with: claim 2d's cells of the same T, by shard size and IID (cached, not re-run)
WEIGHTING_REFERENCE = [f"drift-T{t}-{skew}" for t in DRIFT_T for skew in ("iid", "dirichlet01")]
for _t in DRIFT_T:
    SETTINGS[f"drift-T{_t}-dirichlet01-uniform"] = [*SETTINGS[f"drift-T{_t}-dirichlet01"], "fed.weighting='uniform'"]
EPS_CHECK = {"1e-4": "eps1e-4", "1e-2": "eps1e-2"}  # eps -> setting; 1e-3 (BASE) is the tuning grid's own cell
# Full-FedZO one x4 step above its grid, on validation only: a check, not a grid point (a new dense lr would
# re-run six dense test cells, Full-FedZO's and FedMeZO's, ~1.5 h per task on 2 cores)
DENSE_CHECK_LR = 8e-6
# claim -> (methods, settings, one-line statement)
CLAIMS: dict[str, tuple[list[str], list[str], str]] = {
    "1": (["meerkat", "magnitude", "random", "full_fedzo", CEILING], ["base"],  # sparse first: the cheap cells
          "Meerkat beats Full-FedZO, a weight-magnitude mask and a random mask under Non-IID data"),
    "2": (["meerkat", CEILING], ["T1-iid", "T10-iid", "T1-dirichlet", "T10-dirichlet", "T1-pathological", "T10-pathological"],
          "More frequent sync (T=1 vs T=10, same forward passes) narrows the Non-IID vs IID gap"),
    "3": (["meerkat_d1e-4", "meerkat", "meerkat_d1e-2", "full_fedzo"], ["base"],
          "Accuracy vs density 1e-4, 1e-3, 1e-2, dense: is there an optimum?"),
    "4": (["meerkat", "meerkat_taskmask", "random"], ["base"],
          "A mask from general text (WikiText) is as good as one from the task's own text, better than random"),
    "5": (["meerkat", "full_fedzo"], ["base"],
          "Meerkat needs orders of magnitude fewer bytes than Full-FedZO for the same accuracy"),
    "6": (["fedmezo", "full_fedzo"], ["base"],
          "FedMeZO's personalised lr helps dense federated ZO (vs a fixed lr)"),
    "2d": (["meerkat", "full_fedzo"], DRIFT_SETTINGS,
           ("With drift in it (100 local steps per client), more frequent sync (T=1 vs 10 vs 50) narrows the "
            "Non-IID vs IID gap, and only the sparse method can afford T=1's bytes")),
    "2w": (["meerkat"], [*WEIGHTING_SETTINGS, *WEIGHTING_REFERENCE],
           ("Under Dirichlet 0.1, weighting each sampled client equally (not by shard size) keeps a round from "
            "being one large single-label client's update")),
}
# Claims run only when named (--claims 2d): a plain run and --report-only keep to the finished grid.
# 2d is about 33 cell-hours on 2 cores (BENCHMARKS.md, "Issue 17"); its cells cache and resume like any other.
# 2w is 9 Meerkat cells a task (about 2 cell-hours on AG News).
EXTRA_CLAIMS = ("2d", "2w")


def default_claims() -> list[str]:
    """The claims a run without --claims covers: all but the opt-in ones."""
    return [claim for claim in CLAIMS if claim not in EXTRA_CLAIMS]


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    method: str
    setting: str
    lr: float
    seed: int
    split: str  # validation (tuning) | test

    @property
    def key(self) -> str:
        return f"{self.split}-{self.task}-{self.method}-{self.setting}-lr{self.lr:.3g}-s{self.seed}"

    def overrides(self) -> list[str]:
        extra = list(METHODS[self.method][0])
        if self.method == "meerkat_taskmask":
            extra.append(f"mask.calibration={str(task_text(self.task))!r}")
        if self.method == "fedmezo":  # lr_i = lr + lr_scale * Phi_i in [lr/2, 3lr/2] [choice]
            extra.append(f"fedmezo.lr_scale={self.lr / 2!r}")
        split = [*(f"{key}={value!r}" for key, value in VALIDATION.items()), "run.zero_shot=false",
                 "run.eval_every=0"] if self.split == "validation" else []
        drift = self.setting in (*DRIFT_SETTINGS, *WEIGHTING_SETTINGS)
        whole = [f"task.eval_size={DRIFT_EVAL_SIZE[self.task]}"] if drift else []
        return [*BASE, *TASK_OVERRIDES.get(self.task, []), f"task.name={self.task!r}", *extra,
                *SETTINGS[self.setting], *whole, f"{LR_KEYS.get(self.method, 'zo.lr')}={self.lr!r}",
                f"run.seed={self.seed}", *split, *([f"model.device={DEVICE!r}"] if DEVICE != "cpu" else [])]


def task_text(task: str) -> Path:
    """The task's own training prompts as calibration text (claim 4), written under runs/ (not committed)."""
    from meerkat_fl.tasks import get_task

    path = RUNS / "calibration" / f"{task}.txt"
    if not path.exists():
        data = get_task(task).load("train", data_dir=os.environ.get("MEERKAT_DATA_DIR"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(data.prompts[:4000]) + "\n")
    return path


def lr_grid(method: str) -> list[float]:
    """The method's lr grid: its centre (``LR_CENTRES``, else ``LR_CENTRE`` moved to its density) times its
    factors, by the tuner's ``scale_grid``."""
    centre = LR_CENTRES.get(method) or scale_lr(LR_CENTRE, LR_CENTRE_DENSITY, METHODS[method][1])
    return scale_grid({"zo.lr": centre}, METHOD_LR_FACTORS.get(method, LR_FACTORS), significant=LR_DIGITS)["zo.lr"]

