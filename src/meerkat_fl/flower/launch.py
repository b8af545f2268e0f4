"""Start Flower on this machine, run one Meerkat experiment, stop everything that was started.

``Flower`` owns a private ``FLWR_HOME`` and every process it starts (each in its own process group, so the
SuperNode's SuperExec and the per-message ClientApps go with it); leaving the ``with`` block (normally, on an
error or on Ctrl-C) terminates them. Two shapes:

- simulation: one ``flower-superlink --simulation`` (Ray runs the virtual SuperNodes);
- deployment: one ``flower-superlink`` plus N ``flower-supernode`` on loopback ports, each with
  ``--node-config "partition-id=i num-partitions=N data-dir=..."`` and, optionally, a persistent node worker;
  with ``auth`` (TLS only), Flower's SuperNode authentication: the SuperLink runs ``--enable-supernode-auth``,
  each node's public key is registered (``flwr supernode register``), each node signs with its private key,
  and the ServerApp checks every node against the node map (``auth.py``).

Both call ``flwr run APP NAME --stream`` with the app in ``meerkat_fl/flower/app`` and write the run folder
that ``meerkat run`` writes. No flwr import here: everything goes through Flower's own commands.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from meerkat_fl.config import Config, to_toml
from meerkat_fl.errors import ConfigError, MeerkatError
from meerkat_fl.flower import APP_DIR
from meerkat_fl.flower.auth import NodeAuth, NodeKey, read_node_map_file
from meerkat_fl.progress import Progress, bar, postfix
from meerkat_fl.run import final_metrics
from meerkat_fl.rundir import CHECKPOINT, RunDir

log = logging.getLogger(__name__)
CONNECTION = "meerkat"


class FlowerError(MeerkatError):
    """A Flower process failed to start, or a Flower run did not produce its run folder."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: private FLWR_HOME, no telemetry, this venv's commands first."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def command(name: str) -> str:
    """A Flower command from this interpreter's environment (falls back to PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FlowerError(f"{name} not found: install the extra, pip install 'meerkat-fl[flower]'")
    return found


def descendants_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass(frozen=True)
class Tls:
    """PEM files for a secure SuperLink (see ``tls.make_certificates``)."""

    ca: Path
    cert: Path
    key: Path


class Flower:
    """Processes of one local Flower deployment or simulation, stopped when the ``with`` block ends."""

    def __init__(self, workdir: str | Path, *, tls: Tls | None = None, auth: NodeAuth | None = None):
        if auth is not None and tls is None:
            raise ConfigError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.env = flower_env(self.home)
        self.tls, self.auth = tls, auth
        self.processes: dict[str, subprocess.Popen] = {}
        self.superlink_port: int | None = None

    # --- processes -----------------------------------------------------------------------------------------
    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start ``argv`` in a new process group; its output goes to ``<workdir>/logs/<name>.log``."""
        (self.workdir / "logs").mkdir(exist_ok=True)
        with open(self.workdir / "logs" / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.workdir, start_new_session=True)
        self.processes[name] = proc
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one started process and its process group (used to simulate a node dying)."""
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        """SIGTERM every running process group we started, newest first; SIGKILL what is left after 10 s.
        Leaders that already exited and were reaped are skipped (their group id may be reused)."""
        running = [proc for proc in self.processes.values() if proc.poll() is None]
        # Flower starts some children in sessions of their own (the SuperLink's SuperExec and ServerApp):
        # note every descendant now, while the tree still links them to us.
        descendants = [pid for proc in running for pid in descendants_of(proc.pid)]
        for proc in reversed(running):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10.0
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (SuperExec, ClientApps): make sure it is gone
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Flower:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_port(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.processes[name]
            if proc.poll() is not None:
                raise FlowerError(f"{name} exited with code {proc.returncode}; see {self.workdir}/logs/{name}.log")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise FlowerError(f"{name} did not open port {port} in {timeout:g} s")

    # --- Flower pieces -------------------------------------------------------------------------------------
    def _tls_args(self, server: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if server:
            return ["--ssl-certfile", str(self.tls.cert), "--ssl-keyfile", str(self.tls.key),
                    "--ssl-ca-certfile", str(self.tls.ca)]
        return ["--root-certificates", str(self.tls.ca)]

    def start_superlink(self, *, simulation: bool = False, port: int | None = None) -> int:
        port = port or free_port()
        argv = [command("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation", "--database", str(self.workdir / "superlink.db"),
                *self._tls_args(server=True)]
        if simulation:
            argv.append("--simulation")
        if self.auth is not None:
            argv.append("--enable-supernode-auth")
        self.start("superlink", argv)
        self.wait_port(port, "superlink")
        self.superlink_port = port
        connection: dict[str, Any] = {"address": f"127.0.0.1:{port}"}
        if self.tls is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.tls.ca)
        (self.home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": CONNECTION, CONNECTION: connection}}))
        if self.auth is not None:
            for key in self.auth.keys:
                self.register(key)
        return port

    def register(self, key: NodeKey) -> None:
        """Register a SuperNode's public key with the SuperLink (Control API), under the key's name."""
        self.flwr(["supernode", "register", str(key.public), CONNECTION, "--name", key.name],
                  name=f"register-{key.name}", timeout=120)

    def start_supernode(self, index: int, count: int, node_config: dict[str, Any] | None = None,
                        private_key: Path | None = None) -> str:
        """SuperNode ``index`` of ``count``; extra ``node_config`` keys (data-dir, worker-socket, ...); it signs
        with ``private_key`` (default: node ``index``'s key when authentication is on)."""
        if private_key is None and self.auth is not None and index < len(self.auth.keys):
            private_key = self.auth.keys[index].private
        assert self.superlink_port is not None, "start the SuperLink first"
        settings = {"partition-id": index, "num-partitions": count, **(node_config or {})}
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
        name = f"supernode-{index}"
        self.start(name, [command("flower-supernode"), "--superlink", f"127.0.0.1:{self.superlink_port}",
                          "--port", str(free_port()), "--node-config", text, "--max-retries", "20",
                          *self._tls_args(server=False),
                          *(["--auth-supernode-private-key", str(private_key)] if private_key else [])])
        return name

    def start_worker(self, index: int) -> Path:
        """A persistent node worker for SuperNode ``index``; returns its socket path."""
        path = self.workdir / f"worker-{index}.sock"
        name = f"worker-{index}"
        self.start(name, [sys.executable, "-m", "meerkat_fl.cli", "flower", "worker", "--socket", str(path)])
        deadline = time.monotonic() + 60.0
        while not (path.exists() and Path(str(path) + ".key").exists()):
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                raise FlowerError(f"{name} did not start; see {self.workdir}/logs/{name}.log")
            time.sleep(0.1)
        return path

    def configure_simulation(self, num_supernodes: int, cpus_per_client: int = 1) -> None:
        self.flwr(["federation", "simulation-config", "@none/default", CONNECTION,
                   "--num-supernodes", str(num_supernodes), "--client-resources-num-cpus", str(cpus_per_client),
                   "--client-resources-num-gpus", "0"], name="simulation-config", timeout=120)

    def flwr(self, args: list[str], name: str, timeout: float | None = None,
             while_waiting: Callable[[], None] | None = None) -> None:
        """Run one ``flwr`` CLI command to completion (output in logs/<name>.log); ``while_waiting`` is called
        about once a second until it ends."""
        proc = self.start(name, [command("flwr"), *args])
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                code = proc.wait(timeout=1.0 if left is None else max(0.0, min(1.0, left)))
                break
            except subprocess.TimeoutExpired:
                if left is not None and left <= 1.0:
                    raise FlowerError(f"flwr {args[0]} did not finish in {timeout:g} s") from None
                if while_waiting is not None:
                    while_waiting()
        if code != 0:
            tail = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
            raise FlowerError(f"flwr {' '.join(args[:2])} failed with code {code}:\n{tail}")

    def run(self, cfg: Config, out: str | Path, *, round_timeout: float = 300.0, node_wait: float = 120.0,
            timeout: float | None = None, app_dir: str | Path = APP_DIR, resume: bool = False,
            stop_after: int | None = None, progress: Progress = False) -> dict[str, Any]:
        """``flwr run`` the Meerkat app (or another app dir) with ``cfg``; wait for the run folder; return its
        summary. ``resume`` continues ``out`` from its last checkpoint; ``stop_after`` ends after that many
        rounds (the summary then reads ``interrupted_at_round``). ``progress``: a rounds bar that follows the
        run folder's metrics.jsonl (the ServerApp runs in Flower's process, which shows none)."""
        out = Path(out).resolve()
        if resume and not (out / CHECKPOINT).exists():  # say so before starting Flower
            raise ConfigError(f"resume: {out} holds no checkpoint to continue from")
        (out / "summary.json").unlink(missing_ok=True)  # the wait below is for this run's summary
        app = self.workdir / "app"  # a copy: `flwr run` may write beside the pyproject
        shutil.rmtree(app, ignore_errors=True)
        shutil.copytree(app_dir, app)
        run_config = self.workdir / "run-config.toml"
        run_config.write_text(tomli_w.dumps({"meerkat-config": to_toml(cfg), "set": "", "out": str(out),
                                             "round-timeout": float(round_timeout), "node-wait": float(node_wait),
                                             "resume": bool(resume), "stop-after": int(stop_after or 0),
                                             "node-map": read_node_map_file(self.auth.node_map) if self.auth else ""}))
        rounds_bar = bar(cfg.fed.rounds, "flower", "round", progress)
        try:
            self.flwr(["run", str(app), CONNECTION, "--stream", "--run-config", str(run_config)], name="flwr-run",
                      timeout=timeout, while_waiting=lambda: show_rounds(rounds_bar, out))
            show_rounds(rounds_bar, out)
        finally:
            rounds_bar.close()
        # `--stream` returns when the run ends; the ServerApp writes summary.json last.
        deadline = time.monotonic() + 30.0
        while not (out / "summary.json").exists():
            if time.monotonic() > deadline:
                raise FlowerError(f"the Flower run ended without a summary in {out}; see {self.workdir}/logs/")
            time.sleep(0.5)
        return json.loads((out / "summary.json").read_text())


def run_simulation(cfg: Config, out: str | Path, workdir: str | Path, *, timeout: float | None = None,
                   round_timeout: float = 300.0, resume: bool = False, stop_after: int | None = None,
                   progress: Progress = False) -> dict[str, Any]:
    """One Meerkat run in Flower's Simulation Runtime: one virtual SuperNode per client."""
    with Flower(workdir) as flower:
        flower.start_superlink(simulation=True)
        flower.configure_simulation(cfg.fed.num_clients)
        return flower.run(cfg, out, timeout=timeout, round_timeout=round_timeout, resume=resume,
                          stop_after=stop_after, progress=progress)


def run_deployment(cfg: Config, out: str | Path, workdir: str | Path, *, nodes: int | None = None,
                   tls: Tls | None = None, auth: NodeAuth | None = None, workers: bool = True,
                   timeout: float | None = None, round_timeout: float = 300.0, resume: bool = False,
                   stop_after: int | None = None, progress: Progress = False) -> dict[str, Any]:
    """One Meerkat run on a loopback deployment: a SuperLink and ``nodes`` SuperNodes (default: one per
    client), each with a persistent node worker unless ``workers`` is False; ``auth`` (with ``tls``) registers
    node i's key pair ``auth.keys[i]`` and binds it to its clients in ``auth.node_map``."""
    nodes = nodes or cfg.fed.num_clients
    if auth is not None and len(auth.keys) < nodes:
        raise ConfigError(f"{nodes} nodes but {len(auth.keys)} node keys")
    with Flower(workdir, tls=tls, auth=auth) as flower:
        flower.start_superlink()
        for index in range(nodes):
            flower.start_supernode(index, nodes, node_settings(cfg, flower.start_worker(index) if workers else None))
        return flower.run(cfg, out, timeout=timeout, round_timeout=round_timeout, resume=resume,
                          stop_after=stop_after, progress=progress)


def show_rounds(rounds_bar: Any, out: Path) -> None:
    """Point a rounds bar at a run folder's metrics.jsonl as it stands (read whole each time: a resume
    truncates it): the last round, its train loss, the last evaluation and the bytes so far."""
    try:
        rows = RunDir(out).read_metrics()
    except (OSError, MeerkatError):  # being replaced right now: the next call reads it
        return
    if not rows:
        return
    rounds_bar.n = int(rows[-1].get("round", 0))
    rounds_bar.set_postfix(postfix(rows[-1].get("train_loss"), final_metrics(rows, None),
                                   sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rows)))


def node_settings(cfg: Config, worker_socket: Path | None) -> dict[str, Any]:
    """The node-side config a loopback SuperNode gets: its data folder and, optionally, its worker."""
    settings: dict[str, Any] = {}
    if cfg.task.data_dir:
        settings["data-dir"] = str(cfg.task.data_dir)
    if worker_socket is not None:
        settings["worker-socket"] = str(worker_socket)
    return settings
