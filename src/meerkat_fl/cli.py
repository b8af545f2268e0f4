"""The `meerkat` command: parses, builds a config, calls one library function. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from meerkat_fl import argtypes
from meerkat_fl.errors import MeerkatError
from meerkat_fl.paths import output_file, output_folder

QUIET = "no progress bar (without it: a bar on stderr when stderr is a terminal)"


def _config(args: argparse.Namespace, extra: Sequence[str] = ()):
    from meerkat_fl import config

    method = [f"method={args.method!r}"] if getattr(args, "method", None) else []
    cfg = config.load(getattr(args, "config", None), [*extra, *method, *(args.set or [])])
    return config.validate(config.resolve_environment(cfg))


def _progress(args: argparse.Namespace) -> bool | None:
    """--quiet: no bar; else a bar when stderr is a terminal (meerkat_fl.progress)."""
    return False if args.quiet else None


def _default_out(kind: str, cfg) -> Path:
    from meerkat_fl.config import method_name

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = method_name(cfg) if kind == "run" else kind
    task = cfg.task.name.replace("/", "_").replace(":", "_")  # a hub id names a task too
    return Path("runs") / f"{name}-{task}-{stamp}"


def cmd_mask(args: argparse.Namespace) -> int:
    from meerkat_fl.build import make_mask
    from meerkat_fl.config import Config, MaskConfig, resolve_environment
    from meerkat_fl.masks import save_mask
    from meerkat_fl.models import load_model

    output_file(args.out, "--out")
    cfg = Config(mask=MaskConfig(
        kind=args.kind, density=args.density, scope=args.scope, selection=args.selection,
        calibration=args.calibration, calibration_sequences=args.sequences, calibration_seq_len=args.seq_len,
        score=args.score, seed=args.seed,
    ))
    from meerkat_fl.config import validate

    cfg = validate(resolve_environment(cfg))
    loaded = load_model(args.model, device=args.device, dtype="float32")
    mask = make_mask(cfg.mask, loaded, progress=_progress(args))
    save_mask(mask, args.out)
    print(f"wrote {args.out}: {mask.kind} mask, {mask.size:,} of {mask.scope_numel:,} weights "
          f"({mask.size / mask.scope_numel:.2e}) in {len(mask.names)} tensors, model {mask.fingerprint}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from meerkat_fl.finetune import finetune
    from meerkat_fl.run import resume_config

    if args.resume:
        cfg = resume_config(args.resume)
        summary = finetune(cfg, args.resume, resume=True, progress=_progress(args))
    else:
        shortcuts = [f"{k}={v}" for k, v in (
            ("model.source", args.model), ("task.name", args.task), ("mask.path", args.mask),
            ("train.steps", args.steps), ("zo.lr", args.lr), ("mask.kind", args.kind),
        ) if v is not None]
        cfg = _config(args, shortcuts)
        out = Path(args.out) if args.out else _default_out("finetune", cfg)
        summary = finetune(cfg, out, progress=_progress(args), overwrite=args.overwrite)
        print(f"run folder: {out}")
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from meerkat_fl.build import build_model, build_task_data
    from meerkat_fl.patch import apply_patch, load_patch

    shortcuts = [f"{k}={v}" for k, v in (("model.source", args.model), ("task.name", args.task),
                                           ("task.eval_size", args.eval_size)) if v is not None]
    cfg = _config(args, shortcuts)
    loaded = build_model(cfg)
    if args.patch:
        apply_patch(loaded.model, load_patch(args.patch), loaded.fingerprint)
    data = build_task_data(cfg.task, loaded, cfg.run.seed)
    metrics = data.scorer.evaluate(data.test, batch_size=cfg.task.eval_batch_size, progress=_progress(args))
    print(json.dumps({"task": cfg.task.name, "patch": args.patch, "examples": len(data.test), **metrics}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from meerkat_fl.build import build_model
    from meerkat_fl.patch import export_merged, load_patch

    output_folder(args.out, "--out", overwrite=args.overwrite)  # before loading anything
    cfg = _config(args, [f"model.source={args.model}"] if args.model else [])
    patch = load_patch(args.patch)
    loaded = build_model(cfg)
    out = export_merged(loaded.model, loaded.tokenizer, patch, loaded.fingerprint, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {cfg.model.source} with the {patch.mask.kind} patch {args.patch} merged in")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from meerkat_fl.fed.simulate import simulate
    from meerkat_fl.run import resume_config

    if args.resume:
        cfg = resume_config(args.resume)
        summary = simulate(cfg, args.resume, resume=True, progress=_progress(args))
        out = Path(args.resume)
    else:
        if args.config is None and not args.method:
            raise SystemExit("meerkat run: give a CONFIG.toml, --method NAME, or --resume DIR")
        cfg = _config(args)
        out = Path(args.out) if args.out else _default_out("run", cfg)
        summary = simulate(cfg, out, progress=_progress(args), overwrite=args.overwrite)
    print(f"run folder: {out}")
    print(json.dumps(summary, indent=2))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from meerkat_fl.methods import describe

    print(describe())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from meerkat_fl.tune import load_sweep, parse_grid, table, tune

    if args.resume:
        if args.config or args.set or args.grid:
            raise SystemExit("meerkat tune: --resume DIR takes its config and grid from DIR (no CONFIG/--set/--grid)")
        (base, grid), out = load_sweep(args.resume), Path(args.resume)
    else:
        if args.config is None:
            raise SystemExit("meerkat tune: give a CONFIG.toml or --resume DIR")
        base, grid = _config(args), parse_grid(args.grid) if args.grid else None
        out = output_folder(args.out, "--out", overwrite=True) if args.out else _default_out("tune", base)
    runner = None
    if args.finetune:
        from meerkat_fl.finetune import finetune as runner
    results = tune(base, out, grid, runner=runner, progress=_progress(args))
    print(table(results))
    print(f"sweep folder: {out}\nbest config: {out / 'best.toml'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meerkat_fl.demo import run_demo

    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_demo(out, args.set or [], progress=_progress(args))
    print(result["table"])
    print(f"plot: {result['plot']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from meerkat_fl.report import comparison_table, plot_runs

    output_file(args.out, "--out")
    out = plot_runs(args.runs, args.out, title=args.title)
    print(comparison_table(args.runs))
    print(f"plot: {out}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    import numpy as np

    from meerkat_fl.build import train_rows
    from meerkat_fl.fed.simulate import partition_for
    from meerkat_fl.partition import format_histogram, save_partition

    if args.out:
        output_file(args.out, "--out")
    cfg = _config(args, [f"{k}={v}" for k, v in (
        ("task.name", args.task), ("fed.partition", args.scheme), ("fed.num_clients", args.clients),
        ("fed.alpha", args.alpha), ("fed.num_extreme", args.extreme), ("fed.labels_per_client", args.labels_per_client),
        ("run.seed", args.seed)) if v is not None])
    task, data, _ = train_rows(cfg.task, cfg.run.seed)  # the rows a run with this config partitions
    labels = data.partition_labels
    partition = partition_for(cfg, labels)
    names = [task.partition_names[c] if c >= 0 else "none" for c in np.unique(labels)]  # the labels present
    print(format_histogram(labels, partition, label_names=names))
    if args.out:
        save_partition(partition, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_gradip(args: argparse.Namespace) -> int:
    from meerkat_fl.report import detection_table, gradip_analysis, plot_gradip

    analysis = gradip_analysis(args.run)
    out = output_file(args.out or Path(args.run) / "gradip.png", "--out")
    out = plot_gradip(analysis, out, title=args.title)
    print(detection_table(analysis))
    print(f"plot: {out}")
    return 0


def _add_config_args(p: argparse.ArgumentParser, config_positional: bool = False) -> None:
    if config_positional:
        p.add_argument("config", nargs="?", help="TOML config file")
    else:
        p.add_argument("--config", help="TOML config file")
    p.add_argument("--method", help="the method (see `meerkat methods`); the same as --set method=NAME")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. zo.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="meerkat", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mask", help="build a sparse mask (sensitive, random, magnitude or dense)")
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny, a .gguf, a dir or a hub id")
    p.add_argument("--density", type=float, default=1e-3)
    p.add_argument("--kind", default="sensitive", choices=["sensitive", "random", "magnitude", "dense"])
    p.add_argument("--scope", default=None, choices=["linear", "all"])
    p.add_argument("--selection", default="per_tensor", choices=["per_tensor", "global"])
    p.add_argument("--calibration", default=None, help="text file or folder (default: shared wikitext-2)")
    p.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--score", default="fisher", choices=["fisher", "grad_squared"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("finetune", help="centralised MeZO-style fine-tuning (sparse or dense)")
    _add_config_args(p)
    p.add_argument("--model"), p.add_argument("--task"), p.add_argument("--mask", help="mask file")
    p.add_argument("--kind", help="mask kind when no mask file is given")
    p.add_argument("--steps", type=int), p.add_argument("--lr", type=float)
    p.add_argument("--out"), p.add_argument("--resume", metavar="DIR", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="a model's metrics (optionally with a patch) on a task's test split")
    _add_config_args(p)
    p.add_argument("--model"), p.add_argument("--task"), p.add_argument("--patch")
    p.add_argument("--eval-size", type=int)
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="save the base model with a patch merged in (LoRA: merge_and_unload)")
    _add_config_args(p)
    p.add_argument("--model", help="the base model the patch was trained on (default: model.source)")
    p.add_argument("--patch", required=True), p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="a federated run from a TOML config (in-process simulator)")
    _add_config_args(p, config_positional=True)
    p.add_argument("--out", help="run folder (default runs/<method>-<task>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run to the same result")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("methods", help="list the registered methods with a one-line description")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("tune", help="lr (and eps) sweep scored on a validation split held out of the training data")
    _add_config_args(p, config_positional=True)
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="values of one key, e.g. zo.lr=1e-4,2e-4 (repeatable; default: zo.lr x 1/4, 1/2, 1, 2, 4)")
    p.add_argument("--out", help="sweep folder (default runs/tune-<task>-<time>); an existing one is continued")
    p.add_argument("--resume", metavar="DIR", help="continue a sweep folder with its own config and grid")
    p.add_argument("--finetune", action="store_true", help="sweep centralised fine-tuning instead of federated runs")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the main job: Meerkat vs Full-FedZO on the embedded model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo setting")
    p.add_argument("--out"), p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="the task's primary metric vs round and vs cumulative bytes for several runs, one PNG")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="runs/plot.png"), p.add_argument("--title")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("partition", help="print a partition's per-client label histogram")
    _add_config_args(p)
    p.add_argument("--task"), p.add_argument("--scheme", choices=["iid", "dirichlet", "pathological", "mixture"])
    p.add_argument("--clients", type=int), p.add_argument("--alpha", type=float)
    p.add_argument("--extreme", type=int, help="mixture: single-label clients")
    p.add_argument("--labels-per-client", type=int), p.add_argument("--seed", type=int)
    p.add_argument("--out", help="save the partition as JSON")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("gradip", help="a run's GradIP trajectories (PNG) and Meerkat-vp detection table")
    p.add_argument("run", help="run folder (with gradip.jsonl)")
    p.add_argument("--out", help="PNG path (default DIR/gradip.png)"), p.add_argument("--title")
    p.set_defaults(func=cmd_gradip)

    # imported here, not at the top: flower/commands.py imports this module's helpers
    from meerkat_fl.flower.commands import add_parser as add_flower_parser

    add_flower_parser(sub)
    return parser


def _fail(message: str) -> int:
    print(f"meerkat: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MeerkatError as exc:
        return _fail(str(exc))
    except OSError as exc:  # a path the user named that a check above did not foresee: say which, no traceback
        return _fail(f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc))
    except UnicodeDecodeError as exc:
        return _fail(f"a file that should be UTF-8 text is not ({exc.reason} at byte {exc.start})")
    except KeyboardInterrupt:
        print("meerkat: interrupted; the run folder keeps its last checkpoint (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
