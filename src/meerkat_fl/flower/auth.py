"""Which SuperNode may host which clients: node key pairs for Flower's SuperNode authentication, and the node
map the ServerApp checks every node against.

Flower (1.42) authenticates a SuperNode by an EC key pair: the SuperLink runs with ``--enable-supernode-auth``
(TLS required), the operator registers each node's public key (``flwr supernode register node-0.pub``, over
the Control API), and the node starts with ``--auth-supernode-private-key node-0.key`` and signs every Fleet
request with it. The SuperLink binds each signed request to the node id registered for that key, refuses
self-registration, and tells the ServerApp each node's public key (``grid.get_nodes()``: ``NodeInfo.public_key``,
PEM). Keys are OpenSSH files, as ``flwr`` reads them.

[choice] The identity the ServerApp trusts is that public key, not anything a node says about itself (its
``partition-id``, its handshake's client list): the node map (``nodes.toml``) names, per node, its public key
and the clients it may host. A node whose key is not in the map is never handshaken; a node's claim to a
client outside its entry is ignored; a reply that answers for a client the node was not sent is refused whole
(``server_app.GridTransport``). No flwr import here: the CLI and the launcher use it without the extra.

Left to Flower: its Fleet ``PushMessages`` (1.42, ``superlink/servicer/fleet/fleet_handlers.py:push_messages``)
does not compare a reply's ``metadata.src_node_id`` with the authenticated node; ``LinkState.store_message_res``
only requires it to equal the ``dst_node_id`` of the message replied to. A registered node that learned the id
of a message sent to another node could reply in that node's name; message ids are content hashes of messages
it cannot pull, so we rely on that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w
import tomllib

from meerkat_fl.errors import ConfigError

NODE_MAP = "nodes.toml"


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair on disk: ``private`` for ``--auth-supernode-private-key``, ``public`` for
    ``flwr supernode register``."""

    name: str
    private: Path
    public: Path


@dataclass(frozen=True)
class NodeAuth:
    """What ``meerkat flower deploy --auth`` needs: node i's key pair is ``keys[i]``; ``node_map`` the map file."""

    keys: tuple[NodeKey, ...]
    node_map: Path


def make_node_keys(folder: str | Path, nodes: int, num_clients: int) -> NodeAuth:
    """Write ``node-<i>.key``/``node-<i>.pub`` (EC P-384, OpenSSH) for ``nodes`` SuperNodes and a node map
    giving node i the clients ``cid % nodes == i`` (the clients ``partition-id=i num-partitions=nodes`` hosts)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if nodes < 1 or num_clients < 1:
        raise ConfigError(f"node keys: need at least one node and one client (got {nodes} nodes, {num_clients} clients)")
    ser = _serialization()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys, entries = [], {}
    for index in range(nodes):
        name = f"node-{index}"
        key = ec.generate_private_key(ec.SECP384R1())
        pair = NodeKey(name, folder / f"{name}.key", folder / f"{name}.pub")
        pair.private.touch(mode=0o600)
        pair.private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
        public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
        pair.public.write_text(f"{public} {name}\n")
        entries[name] = {"public-key": public, "clients": [c for c in range(num_clients) if c % nodes == index]}
        keys.append(pair)
    path = folder / NODE_MAP
    path.write_text("# The clients each registered SuperNode may host, by its public key (meerkat flower certs)\n"
                    + tomli_w.dumps(entries))
    return NodeAuth(tuple(keys), path)


def _key_der(text: str | bytes, where: str) -> bytes:
    """A public key (OpenSSH line or PEM) as DER SubjectPublicKeyInfo: one form to compare keys in."""
    from cryptography.exceptions import UnsupportedAlgorithm

    ser = _serialization()
    data = text.encode() if isinstance(text, str) else bytes(text)
    try:
        key = ser.load_pem_public_key(data) if data.lstrip().startswith(b"-----") else ser.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: not a public key ({exc})") from None
    return key.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class NodeMap:
    """Node name → (public key as DER, allowed client ids); built by ``parse_node_map``."""

    entries: dict[str, tuple[bytes, frozenset[int]]]

    def lookup(self, public_key: bytes) -> tuple[str, frozenset[int]] | None:
        """The entry for a key as Flower reports it (PEM bytes), or None (unknown, or no key at all)."""
        if not public_key:
            return None
        try:
            der = _key_der(public_key, "node key")
        except ConfigError:
            return None
        for name, (key, clients) in self.entries.items():
            if key == der:
                return name, clients
        return None


def parse_node_map(text: str, num_clients: int, where: str = "node map") -> NodeMap:
    """Validate a node map's TOML: ``[NAME] public-key = "<OpenSSH or PEM>"``, ``clients = [ids]``; each key
    and each client in one entry at most, client ids in ``[0, num_clients)``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    entries: dict[str, tuple[bytes, frozenset[int]]] = {}
    owner: dict[int, str] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"public-key", "clients"}:
            raise ConfigError(f"{where}: [{name}] needs exactly 'public-key' and 'clients'")
        key, clients = entry["public-key"], entry["clients"]
        if not isinstance(key, str):
            raise ConfigError(f"{where}: [{name}] public-key must be a string")
        der = _key_der(key, f"{where}: [{name}] public-key")
        if any(der == other for other, _ in entries.values()):
            raise ConfigError(f"{where}: [{name}] has the public key of another node")
        if not isinstance(clients, list) or not all(type(c) is int for c in clients):
            raise ConfigError(f"{where}: [{name}] clients must be a list of client ids")
        for cid in clients:
            if not 0 <= cid < num_clients:
                raise ConfigError(f"{where}: [{name}] client {cid} is not in [0, {num_clients})")
            if owner.setdefault(cid, name) != name:
                raise ConfigError(f"{where}: client {cid} is in [{owner[cid]}] and [{name}]")
        entries[name] = (der, frozenset(clients))
    if not entries:
        raise ConfigError(f"{where} names no node")
    return NodeMap(entries)


def read_node_map_file(path: str | Path) -> str:
    """A node map file's text, for the run config (one-line error if unreadable)."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"node map {path}: {exc}") from None
