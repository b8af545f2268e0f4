"""The ClientApp: a Flower node running the simulator's Client objects for the clients it hosts.

Flower may start a new process for every message (Deployment Engine), so nothing lives in this module
between messages except a cache: the run's config and each client's state (data pointer, synced round and,
for the "scalars" downlink, its copy of the global values) live in ``context.state``. The model and data
come from the node (``--node-config`` paths on top of the run's config); with ``worker-socket=PATH`` in the
node config, a persistent node worker does the fitting and no model is loaded here at all.
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from meerkat_fl.errors import MeerkatError
from meerkat_fl.flower import records
from meerkat_fl.flower.node import NodeRuntime, NodeSettings, empty_state

log = logging.getLogger(__name__)
app = ClientApp()
RUNTIME = NodeRuntime()  # reused while this process lives (Flower simulation keeps its actors)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handshake(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return fit(msg, context)


def handshake(msg: Message, context: Context) -> Message:
    """Keep the run's config in the node's state; answer with the client ids this node hosts."""
    text = str(msg.content[records.RECORD][records.CONFIG_KEY])
    settings = NodeSettings.from_node_config(dict(context.node_config))
    context.state[records.STATE_CONFIG] = ConfigRecord({records.CONFIG_KEY: text})
    hosted = settings.hosted_clients(int(json.loads(text)["fed"]["num_clients"]))
    reply: dict = {"client-ids": hosted, "partition-id": settings.partition_id}
    if settings.worker_socket:  # load the model now, not in round 1
        from meerkat_fl.flower import worker

        reply["load-s"] = float(worker.call(settings.worker_socket, "warm",
                                            {"config": text, "overrides": list(settings.overrides)})["load_s"])
    return Message(RecordDict({records.RECORD: ConfigRecord(reply)}), reply_to=msg)


def fit(msg: Message, context: Context) -> Message:
    """Fit every client whose plan the message carries; reply with their updates (missing = failed)."""
    tic = time.perf_counter()
    settings = NodeSettings.from_node_config(dict(context.node_config))
    plans = records.read_plans(msg.content)
    out: dict = {}
    if records.STATE_CONFIG not in context.state:
        out["error"] = records.NO_HANDSHAKE
        return Message(RecordDict({records.RECORD: ConfigRecord(out)}), reply_to=msg)
    text = str(context.state[records.STATE_CONFIG][records.CONFIG_KEY])
    requests = {}
    for cid, blob in plans.items():
        key = records.state_key(cid)
        state = records.read_client_state(context.state[key]) if key in context.state else empty_state()
        requests[cid] = (blob, state)
    try:
        if settings.worker_socket:
            from meerkat_fl.flower import worker

            result = worker.call(settings.worker_socket, "fit",
                                 {"config": text, "overrides": list(settings.overrides), "requests": requests})
        else:
            result = RUNTIME.fit(text, settings.overrides, requests)
    except MeerkatError as exc:
        log.warning("node %s: %s", settings.partition_id, exc)
        out["error"] = str(exc)
        return Message(RecordDict({records.RECORD: ConfigRecord(out)}), reply_to=msg)
    for cid, answer in result["replies"].items():
        if answer["update"] is not None:
            out[records.update_key(cid)] = answer["update"]
            context.state[records.state_key(cid)] = records.client_state_record(answer["state"])
    out["load-s"], out["fit-s"] = float(result["load_s"]), float(result["fit_s"])
    out["handler-s"] = time.perf_counter() - tic
    return Message(RecordDict({records.RECORD: ConfigRecord(out)}), reply_to=msg)
