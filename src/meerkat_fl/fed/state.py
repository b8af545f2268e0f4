"""A client's state between rounds and its one codec, used by checkpoints and by Flower's ``context.state``.

A client carries its data pointer, the round whose global model it holds (``synced_round``) and, depending on
the downlink, that model: the masked values ("scalars") or the seed pool's coefficients and exact accumulator
("scalars"/"pool" with a seed pool). ``to_record`` / ``from_record`` turn it into plain ints and bytes (what a
Flower ConfigRecord and a checkpoint's JSON + byte blobs hold); ``from_record`` validates what it reads, since a
record may come from a file or a node and can be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meerkat_fl.errors import MessageRejected
from meerkat_fl.fed.seedpool import PoolModel

RECORD_INTS = ("epoch", "position", "synced_round")
RECORD_BLOBS = ("values", "pool")


@dataclass
class ClientState:
    epoch: int = 0  # data pointer: epoch of the client's shuffled order
    position: int = 0  # data pointer: next row in that order
    synced_round: int = -1  # the round whose global model the client holds (-1: the initial values)
    values: torch.Tensor | None = None  # float32 masked values at synced_round ("scalars" downlink)
    pool: PoolModel | None = None  # the seed pool's model at synced_round (with a seed pool)

    def to_record(self) -> dict[str, int | bytes]:
        """Plain ints and little-endian bytes (empty when absent)."""
        values = b"" if self.values is None else self.values.detach().cpu().numpy().astype("<f4").tobytes()
        pool = b"" if self.pool is None else self.pool.to_bytes()
        return {"epoch": int(self.epoch), "position": int(self.position), "synced_round": int(self.synced_round),
                "values": values, "pool": pool}

    @classmethod
    def from_record(cls, record: dict[str, Any], mask_size: int, device: torch.device | str = "cpu") -> ClientState:
        """Rebuild and validate a state; a malformed record raises MessageRejected naming the field."""
        ints = {}
        for key in RECORD_INTS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise MessageRejected(f"client state: {key} must be an integer, got {type(value).__name__}")
            ints[key] = int(value)
        if ints["epoch"] < 0 or ints["position"] < 0 or ints["synced_round"] < -1:
            raise MessageRejected(f"client state: negative pointer or round {ints}")
        blobs = {}
        for key in RECORD_BLOBS:
            value = record.get(key, b"")
            if not isinstance(value, (bytes, bytearray)):
                raise MessageRejected(f"client state: {key} must be bytes, got {type(value).__name__}")
            blobs[key] = bytes(value)
        values = None
        if blobs["values"]:
            if len(blobs["values"]) != 4 * mask_size:
                raise MessageRejected(f"client state: {len(blobs['values'])} bytes of values, the mask has "
                                      f"{mask_size} float32 values")
            array = np.frombuffer(blobs["values"], dtype="<f4").astype(np.float32)
            if not np.isfinite(array).all():
                raise MessageRejected("client state: the stored values are not all finite")
            values = torch.from_numpy(array).to(device)
        pool = PoolModel.from_bytes(blobs["pool"], mask_size, device) if blobs["pool"] else None
        return cls(ints["epoch"], ints["position"], ints["synced_round"], values, pool)
