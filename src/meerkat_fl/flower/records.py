"""How Meerkat's messages ride in Flower records, and what they cost on the wire.

Every Meerkat message is one ``MKT1`` blob (``fed/messages.py``); Flower carries it unchanged as a bytes value
of a ConfigRecord, so the server's validation of replies is exactly the simulator's. Keys:

- handshake (query, server → node): ``{"config": resolved run config as JSON}``; reply
  ``{"client-ids": [..], "partition-id": i}``.
- round (train, server → node): ``{"plan.<cid>": MKT1 plan}`` for each client the node hosts this round;
  reply ``{"update.<cid>": MKT1 update}`` plus ``load-s``/``fit-s`` timings (seconds).

``wire_bytes`` counts a whole RecordDict as Flower serialises it (every record, keys and framing of the
records included; the Message envelope and HTTP framing are not).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

RECORD = "meerkat"
CONFIG_KEY = "config"
STATE_CONFIG = "meerkat.config"
NO_HANDSHAKE = "no handshake: this node does not know the run's config"  # a restarted node's first reply


def plan_key(client_id: int) -> str:
    return f"plan.{client_id}"


def update_key(client_id: int) -> str:
    return f"update.{client_id}"


def state_key(client_id: int) -> str:
    return f"meerkat.client.{client_id}"


def plans_record(plans: dict[int, bytes]) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({plan_key(cid): blob for cid, blob in plans.items()})})


def read_plans(content: RecordDict) -> dict[int, bytes]:
    record = content[RECORD]
    return {int(key.split(".", 1)[1]): value for key, value in record.items()
            if key.startswith("plan.") and isinstance(value, bytes)}


def read_updates(content: RecordDict, expected: list[int]) -> dict[int, bytes | None]:
    """Updates for the ``expected`` clients only: a node cannot answer for a client it was not sent."""
    record = content.get(RECORD) if hasattr(content, "get") else None
    values = dict(record.items()) if record is not None else {}
    out: dict[int, bytes | None] = {}
    for cid in expected:
        value = values.get(update_key(cid))
        out[cid] = value if isinstance(value, bytes) else None
    return out


def answered_clients(content: RecordDict) -> list[str]:
    """The client ids a reply holds updates for, as written (``update.<id>`` keys; not necessarily numbers)."""
    record = content.get(RECORD) if hasattr(content, "get") else None
    return [key.split(".", 1)[1] for key in (record.keys() if record is not None else ()) if key.startswith("update.")]


def client_state_record(state: dict) -> ConfigRecord:
    """A hosted client's state record (``ClientState.to_record``: ints and bytes) as Flower keeps it."""
    return ConfigRecord({key: value for key, value in state.items()})


def read_client_state(record: ConfigRecord) -> dict:
    """The state record back (``ClientState.from_record`` validates it when the client is restored)."""
    return dict(record.items())


def wire_bytes(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower ships it: the sum of its serialised objects (records, arrays)."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
    except (ImportError, AttributeError):  # private API moved: fall back to the records' payload count
        return sum(record.count_bytes() for record in content.values())
