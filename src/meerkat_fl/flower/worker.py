"""A persistent per-node worker: keeps the client side (model, data, mask) loaded across Flower messages.

Flower's Deployment Engine starts a new ClientApp process for every message, so a ClientApp that builds the
model itself pays the import and load (~9 s for the tiny model on 2 CPU cores) every round. Started once
next to a SuperNode (``meerkat flower worker --socket PATH``) and named in its node config
(``worker-socket=PATH``), this process does the fitting; the ClientApp only forwards plans and client state
over a local Unix socket. It holds no client state of its own: that stays in Flower's ``context.state``,
so a restarted worker changes nothing but the next round's load time.

The socket is authenticated with a random key written beside it (``PATH.key``, mode 0600), readable only by
the user who runs the SuperNode.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from multiprocessing.connection import Client as Connect
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from meerkat_fl.errors import ConfigError, MeerkatError
from meerkat_fl.flower.node import NodeRuntime

log = logging.getLogger(__name__)


def key_path(socket_path: str | Path) -> Path:
    return Path(str(socket_path) + ".key")


def serve(socket_path: str | Path) -> None:
    """Answer fit requests on ``socket_path`` until killed."""
    socket_path = Path(socket_path)
    if socket_path.is_symlink() or socket_path.exists():  # a stale socket of an earlier worker is replaced
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise ConfigError(f"--socket {socket_path}: exists and is not a socket; refusing to replace it")
        socket_path.unlink()
    key = secrets.token_bytes(32)
    keyfile = key_path(socket_path)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    runtime = NodeRuntime()
    with Listener(str(socket_path), family="AF_UNIX", authkey=key) as listener:
        log.info("node worker listening on %s", socket_path)
        while True:
            try:
                with listener.accept() as conn:
                    kind, payload = conn.recv()
                    conn.send(handle_request(runtime, kind, payload))
            except (EOFError, OSError, MeerkatError) as exc:  # a broken caller must not take the worker down
                log.warning("node worker: request failed: %s", exc)


def handle_request(runtime: NodeRuntime, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    if kind == "fit":
        try:
            return runtime.fit(payload["config"], payload["overrides"], payload["requests"])
        except MeerkatError as exc:
            return {"error": str(exc)}
    if kind == "warm":
        try:
            _, load_s = runtime.client_side(payload["config"], payload["overrides"])
            return {"load_s": load_s}
        except MeerkatError as exc:
            return {"error": str(exc)}
    return {"error": f"unknown request {kind!r}"}


def call(socket_path: str | Path, kind: str, payload: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """Send one request to the worker on ``socket_path`` and return its answer."""
    key = key_path(socket_path).read_bytes()
    with Connect(str(socket_path), family="AF_UNIX", authkey=key) as conn:
        conn.send((kind, payload))
        if not conn.poll(timeout):
            raise TimeoutError(f"node worker at {socket_path} did not answer in {timeout:g} s")
        answer = conn.recv()
    if "error" in answer:
        raise MeerkatError(f"node worker at {socket_path}: {answer['error']}")
    return answer
