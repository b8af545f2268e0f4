"""A federation's checkpoint: the server's state, every client's ``ClientState`` (through its one codec), and
what makes a resume honest: the resolved config it was written under and a checksum of its tensors.

Clients synced to the same round hold identical models, so each distinct state blob is stored once (keyed by
its hash). ``load`` refuses a checkpoint whose tensors do not match their checksum (a flipped byte) and one
written under another config (naming the keys that differ; ``fed.rounds`` may be raised to extend a run).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from meerkat_fl.errors import ConfigError, MessageRejected
from meerkat_fl.fed.state import RECORD_BLOBS, RECORD_INTS, ClientState

FORMAT = 2  # 1: before the ClientState codec (per-round tensors, no checksum)
EXTENDABLE = ("fed.rounds", "train.steps")  # keys a resume may raise on purpose, to extend a run
# keys added since format 2, with the value a checkpoint written before them was written under
ADDED_KEYS = {"zo.noise": "gaussian", "zo.noise_generator": "torch_cpu", "run.tensorboard": False,
              "lr_schedule.kind": "constant", "lr_schedule.final": 0.0, "lr_schedule.warmup": 0}


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def pack_clients(states: Mapping[int, ClientState]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(blob tensors, JSON) for every client's state; identical blobs are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for cid, state in states.items():
        record = state.to_record()
        entry: dict[str, Any] = {key: record[key] for key in RECORD_INTS}
        for key in RECORD_BLOBS:
            blob = record[key]
            if not blob:
                continue
            name = f"client.blob.{hashlib.sha256(blob).hexdigest()[:24]}"
            if name not in tensors:
                tensors[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            entry[key] = name
        plain[str(cid)] = entry
    return tensors, plain


def unpack_clients(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any], mask_size: int,
                   device: torch.device | str) -> dict[int, ClientState]:
    states = {}
    # clients that shared one pool model when saved share it again: pool models are read-only once built
    # (seedpool.client_catch_up), and a dense one is 8 bytes a weight (a resumed 10-client FedKSeed run at 135M
    # held ten 1 GB copies, 19 GB, where the uninterrupted run held one)
    pools: dict[str, Any] = {}
    for cid, entry in plain.items():
        record: dict[str, Any] = {key: entry[key] for key in RECORD_INTS}
        shared_pool = pools.get(entry.get("pool", ""))
        for key in RECORD_BLOBS:
            known = key == "pool" and shared_pool is not None
            record[key] = tensors[entry[key]].numpy().tobytes() if key in entry and not known else b""
        try:
            state = ClientState.from_record(record, mask_size, device)
        except MessageRejected as exc:
            raise ConfigError(f"checkpoint: client {cid}: {exc}") from None
        if shared_pool is not None:
            state.pool = shared_pool
        elif state.pool is not None:
            pools[entry["pool"]] = state.pool
        states[int(cid)] = state
    return states


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two flattened configs (``EXTENDABLE`` keys excluded)."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys
            if k not in EXTENDABLE and _plain(saved.get(k, ADDED_KEYS.get(k))) != _plain(current.get(k))]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def pack(server_tensors: dict[str, torch.Tensor], server_state: dict[str, Any], clients: Mapping[int, ClientState],
         flat_config: Mapping[str, Any], extra: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a federation checkpoint holds, with its checksum and config."""
    client_tensors, client_plain = pack_clients(clients)
    tensors = {**server_tensors, **client_tensors}
    state = {**server_state, "clients": client_plain, "format": FORMAT, "config": {k: _plain(v) for k, v in flat_config.items()},
             "tensors_sha256": tensors_checksum(tensors), **extra}
    return tensors, state


def check(tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], flat_config: Mapping[str, Any], where: str,
          length_key: str = "fed.rounds") -> None:
    """Refuse a checkpoint of another format, with damaged tensors, or written under another config.

    ``length_key``: the key that sets the run's length (fed.rounds, or train.steps for finetune), over which a
    decaying lr schedule runs: it may not change on resume under one."""
    if state.get("format") != FORMAT:
        raise ConfigError(f"{where}: checkpoint format {state.get('format', 1)}, this version reads {FORMAT}: "
                          "resume it with the meerkat-fl version that wrote it, or start the run again")
    if tensors_checksum(tensors) != state.get("tensors_sha256"):
        raise ConfigError(f"{where}: the checkpoint's tensors do not match their checksum (the file is damaged)")
    differ = config_differences(state.get("config", {}), flat_config)
    if differ:
        shown = ", ".join(f"{k} ({state['config'].get(k)!r} -> {_plain(flat_config.get(k))!r})" for k in differ[:6])
        raise ConfigError(f"{where}: the config changed since the checkpoint was written: {shown}"
                          f"{' ...' if len(differ) > 6 else ''}; only fed.rounds and train.steps may change on resume")
    before, now = state.get("config", {}).get(length_key), flat_config.get(length_key)
    if before != now and flat_config.get("lr_schedule.kind", "constant") != "constant":
        raise ConfigError(f"{where}: {length_key} changed ({before!r} -> {now!r}) under "
                          f"lr_schedule.kind={flat_config['lr_schedule.kind']}: the schedule decays over {length_key}, "
                          "so the lr of every later unit would change; resume with the run's own length, or extend "
                          "only a constant-lr run")


def client_states_from(clients: Mapping[int, Any]) -> dict[int, ClientState]:
    return {cid: client.state() for cid, client in clients.items()}
