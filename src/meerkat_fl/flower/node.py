"""What a Flower node does with a round, without Flower: build the client side from the run's config plus
node-side settings, restore each hosted client's state, fit, and hand back updates and new states.

Used by the ClientApp (in its own process) and by the persistent node worker (``worker.py``), which is why it
imports neither flwr nor, at module level, torch: a ClientApp that forwards to a worker stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from meerkat_fl.errors import ConfigError, MeerkatError

log = logging.getLogger(__name__)

# The settings a SuperNode may set in its --node-config, by their dotted keys (the one override grammar): the
# base model, the data and the device come from the node, never from the app bundle; a node cannot change how
# the federation trains. The dashed names are the older aliases, still read.
NODE_KEYS = ("task.data_dir", "model.source", "mask.path", "model.device")
NODE_OVERRIDES = {
    "data-dir": "task.data_dir",
    "model-source": "model.source",
    "mask-path": "mask.path",
    "device": "model.device",
}
PARTITION_ID, NUM_PARTITIONS, WORKER_SOCKET = "partition-id", "num-partitions", "worker-socket"


@dataclass(frozen=True)
class NodeSettings:
    """A node's own settings, from Flower's ``context.node_config``."""

    partition_id: int
    num_partitions: int | None = None
    overrides: tuple[str, ...] = ()  # dotted key=value strings, applied on top of the run's config
    worker_socket: str | None = None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        if PARTITION_ID not in node_config:
            raise ConfigError(f"node config has no {PARTITION_ID!r}: start the SuperNode with "
                              f"--node-config 'partition-id=I num-partitions=N'")
        num = node_config.get(NUM_PARTITIONS)
        settings = {key: node_config[alias] for alias, key in NODE_OVERRIDES.items()
                    if node_config.get(alias) not in (None, "")}
        for key, value in node_config.items():
            if "." in key and key not in NODE_KEYS:
                raise ConfigError(f"node config key {key!r}: a node may set only {', '.join(NODE_KEYS)}")
            if key in NODE_KEYS and value not in (None, ""):
                settings[key] = value
        overrides = tuple(f"{key}={json.dumps(str(value))}" for key, value in sorted(settings.items()))
        socket = node_config.get(WORKER_SOCKET) or None
        return cls(int(node_config[PARTITION_ID]), None if num is None else int(num), overrides,
                   None if socket is None else str(socket))

    def hosted_clients(self, num_clients: int) -> list[int]:
        """Client ids this node runs: ``cid % num_partitions == partition_id`` (just ``partition_id`` alone
        when the node does not say how many partitions there are)."""
        if self.num_partitions is None:
            return [self.partition_id] if self.partition_id < num_clients else []
        return [cid for cid in range(num_clients) if cid % self.num_partitions == self.partition_id]


def config_to_json(cfg) -> str:
    """The resolved config as the server sends it to nodes: JSON keeps None and tuples exactly."""
    from meerkat_fl import config

    return json.dumps(config.to_dict(cfg), sort_keys=True)


def node_config(run_config_json: str, overrides: tuple[str, ...] | list[str]):
    """The Config a node trains with: the run's resolved config plus the node's own paths."""
    from meerkat_fl import config

    try:
        cfg = config.from_plain(json.loads(run_config_json))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"the run config sent to this node is malformed: {exc}") from None
    return config.validate(config.apply_overrides(cfg, list(overrides)))


def empty_state() -> dict[str, Any]:
    """A client's state before its first round, as ``ClientState.to_record`` writes it."""
    return {"epoch": 0, "position": 0, "synced_round": -1, "values": b"", "pool": b""}


@dataclass
class NodeRuntime:
    """The client side (model, data, mask, partition) built once per process and config, then reused: in
    Flower simulation and in the node worker, processes outlive messages, so a round costs no reload."""

    key: str | None = None
    side: Any = None
    load_seconds: float = 0.0
    loads: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def client_side(self, run_config_text: str, overrides: tuple[str, ...] | list[str]):
        key = hashlib.sha256(json.dumps([run_config_text, list(overrides)]).encode()).hexdigest()
        if key != self.key:
            tic = time.perf_counter()  # the import counts: a fresh ClientApp process pays it too
            from meerkat_fl.fed.simulate import build_client_side

            self.side = build_client_side(node_config(run_config_text, overrides))
            self.key, self.load_seconds, self.loads = key, time.perf_counter() - tic, self.loads + 1
            log.info("built the client side in %.2f s", self.load_seconds)
            return self.side, self.load_seconds
        return self.side, 0.0

    def fit(self, run_config_text: str, overrides: tuple[str, ...] | list[str],
            requests: dict[int, tuple[bytes, dict[str, Any]]]) -> dict[str, Any]:
        """Fit each requested client from its plan and state; a failing client gets ``update`` None.

        Returns ``{"replies": {cid: {"update", "state", "error"}}, "load_s", "fit_s"}``.
        """
        side, load_s = self.client_side(run_config_text, overrides)
        tic = time.perf_counter()
        replies = {cid: fit_one(side, cid, plan, state) for cid, (plan, state) in requests.items()}
        return {"replies": replies, "load_s": load_s, "fit_s": time.perf_counter() - tic}


def fit_one(side, client_id: int, plan_blob: bytes, state: dict[str, Any]) -> dict[str, Any]:
    """Restore a hosted client from its state record (``fed/state.py``'s codec), fit, return the new record."""
    from meerkat_fl.fed.messages import decode_plan, encode_update
    from meerkat_fl.fed.state import ClientState

    client = side.clients.get(client_id)
    if client is None:
        return {"update": None, "state": state, "error": f"this node has no client {client_id}"}
    try:
        client.load_state(ClientState.from_record(state, side.params.size, side.params.device))
        update = client.fit(decode_plan(plan_blob), side.runtime)
    except MeerkatError as exc:  # dropped for the round by the server, as in the in-process transport
        log.warning("client %d failed: %s", client_id, exc)
        return {"update": None, "state": state, "error": str(exc)}
    return {"update": encode_update(update), "state": client.state().to_record(), "error": ""}
