"""`meerkat flower sim|deploy|certs|worker`: the Flower subcommands of the `meerkat` command (split from cli.py).

They parse and delegate to ``launch``, ``tls``, ``auth`` and ``worker``, none of which imports flwr, so
`meerkat --help` and the parser load without the ``[flower]`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meerkat_fl import argtypes
from meerkat_fl.cli import QUIET, _add_config_args, _config, _default_out, _progress
from meerkat_fl.paths import output_folder


def cmd_flower(args: argparse.Namespace) -> int:
    """`meerkat flower worker|certs|sim|deploy`: one dispatcher, as the subcommands share their run options."""
    import tempfile

    from meerkat_fl.flower import launch

    if args.flower_command == "worker":
        from meerkat_fl.flower.worker import serve

        serve(args.socket)
        return 0
    if args.flower_command == "certs":
        from meerkat_fl.flower.tls import make_certificates

        output_folder(args.dir, "certificate folder", overwrite=True)
        tls = make_certificates(args.dir, tuple(args.host or ("127.0.0.1", "localhost")))
        print(f"wrote {tls.ca}, {tls.cert}, {tls.key}")
        if args.nodes:
            from meerkat_fl.flower.auth import make_node_keys

            auth = make_node_keys(args.dir, args.nodes, args.clients or args.nodes)
            print(f"wrote {', '.join(str(k.private) + '/.pub' for k in auth.keys)}, {auth.node_map}")
        return 0
    if getattr(args, "auth", False) and not args.tls:
        from meerkat_fl.errors import ConfigError

        raise ConfigError("flower deploy --auth needs --tls: Flower authenticates SuperNodes over TLS only")
    if args.resume:
        from meerkat_fl.run import resume_config

        if args.config or args.set:
            raise SystemExit("meerkat flower: --resume DIR takes its config from DIR/config.toml (no CONFIG/--set)")
        out = Path(args.resume)
        cfg = resume_config(out)
    else:
        cfg = _config(args)
        default = _default_out("run", cfg)
        out = Path(args.out) if args.out else default.with_name(f"flower-{default.name}")
    workdir = (output_folder(args.workdir, "--workdir", overwrite=True) if args.workdir
               else Path(tempfile.mkdtemp(prefix="meerkat-flower-")))
    print(f"Flower work folder (state, logs): {workdir}", file=sys.stderr)
    more = {"resume": bool(args.resume), "stop_after": args.stop_after, "progress": _progress(args)}
    if args.flower_command == "sim":
        summary = launch.run_simulation(cfg, out, workdir, round_timeout=args.round_timeout, **more)
    else:
        tls, auth = None, None
        if args.tls:
            from meerkat_fl.flower.tls import make_certificates

            tls = make_certificates(workdir / "certs")
        if args.auth:
            from meerkat_fl.flower.auth import make_node_keys

            auth = make_node_keys(workdir / "certs", args.nodes or cfg.fed.num_clients, cfg.fed.num_clients)
        summary = launch.run_deployment(cfg, out, workdir, nodes=args.nodes, tls=tls, auth=auth,
                                        workers=not args.no_worker,
                                        round_timeout=args.round_timeout, **more)
    print(f"run folder: {out}")
    print(json.dumps(summary, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `meerkat flower` and its subcommands to the `meerkat` parser's subcommands."""
    p = sub.add_parser("flower", help="run on Flower: local simulation, loopback deployment, TLS certificates")
    flower = p.add_subparsers(dest="flower_command", required=True)
    for name, text in (("sim", "a run in Flower's Simulation Runtime (one virtual SuperNode per client)"),
                       ("deploy", "a run on a loopback deployment: a SuperLink and N SuperNodes")):
        q = flower.add_parser(name, help=text)
        _add_config_args(q, config_positional=True)
        q.add_argument("--out", help="run folder (default runs/flower-<method>-<task>-<time>)")
        q.add_argument("--workdir", help="Flower state and logs (default: a new temporary folder)")
        q.add_argument("--round-timeout", type=argtypes.number(float, 1.0, 7 * 86400.0), default=300.0,
                       help="seconds before a silent node is dropped")
        q.add_argument("--resume", metavar="DIR", help="continue a Flower run folder from its last checkpoint")
        q.add_argument("--stop-after", type=argtypes.number(int, 1, argtypes.max_round), metavar="N",
                       help="end after N rounds (continue with --resume)")
        q.add_argument("--quiet", action="store_true", help=QUIET)
        q.set_defaults(func=cmd_flower)
        if name == "deploy":
            q.add_argument("--nodes", type=argtypes.number(int, 1, argtypes.max_clients), help="SuperNodes (default: one per client)")
            q.add_argument("--tls", action="store_true", help="secure SuperLink with generated self-signed certs")
            q.add_argument("--auth", action="store_true",
                           help="with --tls: only registered SuperNodes join, each bound to its clients")
            q.add_argument("--no-worker", action="store_true",
                           help="no persistent node worker: each ClientApp process loads the model itself")
    q = flower.add_parser("certs", help="write a self-signed CA and SuperLink certificate (ca.pem, server.pem/key)")
    q.add_argument("dir"), q.add_argument("--host", action="append", help="name or IP in the certificate")
    q.add_argument("--nodes", type=argtypes.number(int, 1, argtypes.max_clients),
                   help="also write N SuperNode key pairs (node-<i>.key/.pub) and nodes.toml")
    q.add_argument("--clients", type=argtypes.number(int, 1, argtypes.max_clients),
                   help="clients in nodes.toml, node i hosting cid %% N == i (default N)")
    q.set_defaults(func=cmd_flower)
    q = flower.add_parser("worker", help="a persistent node worker (keeps the model loaded for a SuperNode)")
    q.add_argument("--socket", required=True, help="Unix socket path; name it in --node-config worker-socket=")
    q.set_defaults(func=cmd_flower)
