"""Transports move encoded plans to clients and encoded updates back. The simulator and Flower differ
only here (as Flower's Grid has an in-memory twin)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from meerkat_fl.errors import MeerkatError, MessageRejected
from meerkat_fl.fed.client import Client, ClientRuntime
from meerkat_fl.fed.messages import decode_plan, encode_update

log = logging.getLogger(__name__)


class Transport(Protocol):
    def send_and_receive(self, plans: Mapping[int, bytes]) -> Mapping[int, bytes | MessageRejected | None]:
        """Deliver each client its plan; return its reply, None when it failed or did not answer, or the
        reason the transport refused it (the server counts it as a rejected reply)."""
        ...


class InProcessTransport:
    """Runs clients one after another on the shared model, through the real wire format."""

    def __init__(self, clients: dict[int, Client], runtime: ClientRuntime):
        self.clients, self.runtime = clients, runtime

    def send_and_receive(self, plans: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies: dict[int, bytes | None] = {}
        for cid in plans:  # one plan's bytes alive at a time (EncodedPlans encodes on read)
            try:
                replies[cid] = encode_update(self.clients[cid].fit(decode_plan(plans[cid]), self.runtime))
            except MeerkatError as exc:  # a failing client is dropped for the round, the run goes on
                log.warning("client %d failed: %s", cid, exc)
                replies[cid] = None
        return replies
