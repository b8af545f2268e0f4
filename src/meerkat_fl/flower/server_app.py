"""The ServerApp: the simulator's round loop (``simulate``) with a transport over Flower's Grid.

The server object, its validation of replies, the run folder and the patch are exactly those of
``meerkat run``; only ``GridTransport`` is Flower-specific. Run config keys (``[tool.flwr.app.config]``):

- ``meerkat-config``: the Meerkat config as TOML text ("" = defaults);
- any setting by its dotted key, exactly as ``meerkat run --set`` takes it (``fed.rounds = 5``,
  ``method = "fedkseed"``; a list as its TOML text, ``"lora.targets" = '["q_proj", "v_proj"]'``, since Flower's
  config values cannot be lists); ``set``: the same overrides in one string, shell-quoted
  (``"fed.rounds=5 'lora.targets=[\"q_proj\", \"v_proj\"]'"``); all through the one validator;
- ``out``: run folder on the SuperLink's machine ("" = runs/flower-<method>-<task>-<time>);
- ``round-timeout``: seconds to wait for a round's replies (a node that has not answered is dropped for
  the round); ``node-wait``: seconds to wait at start for nodes hosting every client;
- ``node-map``: TOML text naming, per registered SuperNode public key, the clients it may host (``auth.py``);
  "" = trust what nodes claim (first claim wins), as on a SuperLink without SuperNode authentication.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import tomllib
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from meerkat_fl import config
from meerkat_fl.config import Config, method_name
from meerkat_fl.errors import ConfigError, MessageRejected
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.flower import records
from meerkat_fl.flower.auth import NodeMap, parse_node_map
from meerkat_fl.flower.node import config_to_json
from meerkat_fl.rundir import RunDir

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    cfg = config_from_run_config(run_config)
    out = str(run_config.get("out") or "") or f"runs/flower-{method_name(cfg)}-{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    node_map_text = str(run_config.get("node-map") or "")
    node_map = parse_node_map(node_map_text, cfg.fed.num_clients, "run config 'node-map'") if node_map_text.strip() else None
    transport = GridTransport(grid, cfg, round_timeout=float(run_config.get("round-timeout", 300.0)),
                              node_wait=float(run_config.get("node-wait", 120.0)), node_map=node_map)
    # resume: continue the run folder from its last checkpoint (the server's state; clients keep theirs when
    # their nodes kept running, else they start afresh: new data pointers, and "scalars" clients rebuild).
    resume = bool(run_config.get("resume", False))
    if resume and not (Path(out).is_dir() and RunDir(out).has_checkpoint()):
        raise ConfigError(f"resume: {out} holds no checkpoint to continue from")
    stop_after = int(run_config.get("stop-after", 0)) or None  # end after this many rounds (resume later)
    summary = simulate(cfg, out, transport=transport, progress=False, resume=resume, stop_after=stop_after)
    summary.update(transport.summary())
    RunDir(out).write_summary(summary, cfg.model.device, cfg.model.dtype)
    log.info("run folder: %s", Path(out).resolve())


def config_from_run_config(run_config: dict) -> Config:
    """The Meerkat config a run carries: TOML text plus dotted overrides, validated."""
    text = str(run_config.get("meerkat-config") or "")
    try:
        cfg = config.from_dict(tomllib.loads(text)) if text.strip() else Config()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run config 'meerkat-config' is not valid TOML: {exc}") from None
    dotted = {key: value for key, value in run_config.items() if config.is_config_key(key)}
    cfg = config.apply_overrides(cfg, dotted)
    overrides = config.parse_override_list(str(run_config.get("set") or ""))
    return config.validate(config.apply_overrides(cfg, overrides))


class GridTransport:
    """Meerkat's Transport over a Flower Grid: one message per node per round, carrying the plans of the
    clients that node hosts. Nodes are found by a handshake (query message) that also hands them the config.

    With a ``node_map``, a node is known by the public key Flower registered for it (``grid.get_nodes()``), not
    by what it says: a node whose key is not in the map is never handshaken, and it hosts only the clients of
    its entry that it also claims. Without one, nodes' claims are trusted (the first claim of a client wins).
    Either way, a reply that answers for a client the node was not sent is refused whole, every client in it
    counted as a rejected reply, since a node caught forging is not trusted for its own clients either."""

    def __init__(self, grid: Grid, cfg: Config, *, round_timeout: float = 300.0, node_wait: float = 120.0,
                 node_map: NodeMap | None = None):
        self.grid, self.round_timeout, self.node_wait, self.node_map = grid, round_timeout, node_wait, node_map
        self.config_json = config_to_json(cfg)
        self.num_clients = cfg.fed.num_clients
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.seen: set[int] = set()  # nodes that answered the handshake
        self.names: dict[int, str] = {}  # node id -> its name in the node map
        self.allowed: dict[int, frozenset[int]] = {}  # node id -> the clients its entry allows
        self.unmapped: set[int] = set()  # nodes whose key is not in the node map: ignored
        self.round = 0
        self.started = False
        self.wire = {"down": 0, "up": 0}  # this round's Flower record bytes
        self.totals = {"flower_bytes_down": 0, "flower_bytes_up": 0, "handshake_bytes": 0, "forged_replies": 0,
                       "refused_claims": 0}
        self.forged = 0  # this round's replies for clients a node was not sent
        self.timings: dict[str, float] = {}

    # --- nodes -------------------------------------------------------------------------------------------
    def _handshake(self, node_ids: list[int]) -> None:
        content = RecordDict({records.RECORD: ConfigRecord({records.CONFIG_KEY: self.config_json})})
        size = records.wire_bytes(content)
        messages = [Message(content, dst_node_id=nid, message_type=MessageType.QUERY, group_id="handshake")
                    for nid in node_ids]
        self.totals["handshake_bytes"] += size * len(messages)
        # nodes load their model while answering: allow the longer of the two waits
        for reply in self.grid.send_and_receive(messages, timeout=max(self.round_timeout, self.node_wait)):
            if reply.has_error():
                log.warning("handshake failed: %s", reply.error.reason)
                continue
            self.seen.add(reply.metadata.src_node_id)  # nodes that did not answer are asked again next round
            self.totals["handshake_bytes"] += records.wire_bytes(reply.content)
            record = reply.content[records.RECORD]
            nid = reply.metadata.src_node_id
            claimed = sorted({int(cid) for cid in record["client-ids"] if 0 <= int(cid) < self.num_clients})
            if self.node_map is not None:
                allowed = self.allowed.get(nid, frozenset())
                refused = [cid for cid in claimed if cid not in allowed]
                if refused:
                    self.totals["refused_claims"] += len(refused)
                    log.warning("node %s claims clients %s outside its entry in the node map: ignored",
                                self.label(nid), refused)
                claimed = [cid for cid in claimed if cid in allowed]
            for cid in claimed:
                if self.node_of.setdefault(cid, nid) != nid:
                    log.warning("client %d is claimed by nodes %d and %d: keeping the first", cid, self.node_of[cid], nid)
            log.info("node %s (partition %s) hosts clients %s", self.label(nid), record["partition-id"], claimed)

    def label(self, nid: int) -> str:
        return f"{self.names[nid]} ({nid})" if nid in self.names else str(nid)

    def _admit(self, node_ids: list[int]) -> list[int]:
        """The nodes the node map knows (all of them without a map); the others are logged once and ignored."""
        if self.node_map is None or not node_ids:
            return node_ids
        keys = {int(info.node_id): bytes(info.public_key) for info in self.grid.get_nodes()}
        admitted = []
        for nid in node_ids:
            entry = self.node_map.lookup(keys.get(nid, b""))
            if entry is None:
                self.unmapped.add(nid)
                log.warning("node %d: its public key is not in the node map: ignored", nid)
                continue
            self.names[nid], self.allowed[nid] = entry
            admitted.append(nid)
        return admitted

    def _refresh_nodes(self) -> None:
        """Handshake new nodes; forget clients whose node left. At the start, wait until every client has
        a node (or ``node_wait`` runs out: the missing clients are then dropped every round)."""
        deadline = time.monotonic() + (0.0 if self.started else self.node_wait)
        while True:
            live = set(self.grid.get_node_ids())
            self.node_of = {cid: nid for cid, nid in self.node_of.items() if nid in live}
            self.seen &= live  # a node that comes back is handshaken again (with --auth, under the same id)
            new = self._admit(sorted(live - self.seen - self.unmapped))
            if new:
                self._handshake(new)
            if len(self.node_of) >= self.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if not self.started:
            missing = sorted(set(range(self.num_clients)) - set(self.node_of))
            if missing:
                log.warning("no node hosts clients %s: they are dropped every round", missing)
        self.started = True

    # --- Transport -----------------------------------------------------------------------------------------
    def send_and_receive(self, plans: Mapping[int, bytes]) -> dict[int, bytes | MessageRejected | None]:
        self._refresh_nodes()
        replies: dict[int, bytes | MessageRejected | None] = {cid: None for cid in plans}
        by_node: dict[int, dict[int, bytes]] = {}
        for cid, blob in plans.items():
            if cid in self.node_of:
                by_node.setdefault(self.node_of[cid], {})[cid] = blob
        self.wire = {"down": 0, "up": 0}
        self.timings, self.forged = {}, 0
        messages, expected = [], {}
        for nid, node_plans in by_node.items():
            content = records.plans_record(node_plans)
            self.wire["down"] += records.wire_bytes(content)
            messages.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN,
                                    group_id=str(self.round)))
            expected[nid] = sorted(node_plans)
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error() or nid not in expected:
                log.warning("round %d: error from node %s: %s", self.round, nid,
                            reply.error.reason if reply.has_error() else "unexpected sender")
                continue
            self.wire["up"] += records.wire_bytes(reply.content)
            foreign = sorted(set(records.answered_clients(reply.content)) - {str(cid) for cid in expected[nid]})
            if foreign:
                self.forged += len(foreign)
                reason = (f"node {self.label(nid)} answered for client(s) {', '.join(foreign)} that it was not sent: "
                          f"its whole reply is refused")
                log.warning("round %d: %s", self.round, reason)
                replies.update({cid: MessageRejected(reason) for cid in expected.pop(nid)})
                continue
            record = reply.content[records.RECORD]
            if "error" in record:
                log.warning("round %d: node %d: %s", self.round, nid, record["error"])
                if record["error"] == records.NO_HANDSHAKE:  # restarted under the same (registered) node id
                    self.seen.discard(nid)
            for key in ("load-s", "fit-s", "handler-s"):
                if key in record:
                    self.timings[key] = max(self.timings.get(key, 0.0), float(record[key]))
            replies.update(records.read_updates(reply.content, expected.pop(nid)))
        for nid in expected:
            log.warning("round %d: node %d did not answer in %.0f s", self.round, nid, self.round_timeout)
        self.totals["flower_bytes_down"] += self.wire["down"]
        self.totals["flower_bytes_up"] += self.wire["up"]
        self.totals["forged_replies"] += self.forged
        self.round += 1
        return replies

    def round_metrics(self) -> dict[str, float | int]:
        """Extra per-round columns: every record byte Flower moved, and the slowest node's timings."""
        metrics: dict[str, float | int] = {"flower_bytes_down": self.wire["down"], "flower_bytes_up": self.wire["up"],
                                           "forged_replies": self.forged}
        metrics.update({f"client_{k.replace('-', '_')}": v for k, v in self.timings.items()})
        return metrics

    def summary(self) -> dict[str, float | int | str]:
        return {"engine": "flower", **self.totals,
                "flower_nodes": len(set(self.node_of.values())), "unmapped_nodes": len(self.unmapped),
                "clients_without_node": json.dumps(sorted(set(range(self.num_clients)) - set(self.node_of)))}
