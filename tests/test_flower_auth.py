"""The node map and node keys behind ``meerkat flower deploy --tls --auth`` (no Flower processes here; the
loopback test is ``test_flower.py::test_only_registered_nodes_join_and_none_answers_for_another_nodes_client``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

pytest.importorskip("flwr", reason="the Flower tests need the [flower] extra: pip install -e '.[flower]'")

from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

from meerkat_fl import cli
from meerkat_fl.errors import ConfigError
from meerkat_fl.flower.auth import make_node_keys, parse_node_map
from meerkat_fl.flower.launch import Flower


def test_node_map_binds_flowers_registered_key_to_clients(tmp_path):
    auth = make_node_keys(tmp_path, nodes=2, num_clients=5)
    node_map = parse_node_map(auth.node_map.read_text(), 5)
    # the key as Flower hands it to the ServerApp (NodeInfo.public_key: PEM) finds the node's entry
    for index, key in enumerate(auth.keys):
        pem = public_key_to_bytes(bytes_to_public_key(_pem_of(key.public)))
        assert node_map.lookup(pem) == (key.name, frozenset(range(index, 5, 2)))
    other = make_node_keys(tmp_path / "other", 1, 1).keys[0]
    assert node_map.lookup(_pem_of(other.public)) is None and node_map.lookup(b"") is None
    assert (auth.keys[0].private.stat().st_mode & 0o777) == 0o600


def _pem_of(public: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    key = ser.load_ssh_public_key(public.read_bytes())
    return key.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)


def test_bad_node_maps_are_one_line_errors(tmp_path):
    auth = make_node_keys(tmp_path, nodes=2, num_clients=2)
    good = tomllib.loads(auth.node_map.read_text())
    key0, key1 = good["node-0"]["public-key"], good["node-1"]["public-key"]
    cases = {
        "not valid TOML": "[node-0",
        "names no node": "",
        "exactly 'public-key' and 'clients'": f'[a]\npublic-key = "{key0}"\n',
        "not a public key": '[a]\npublic-key = "ssh-ed25519 AAAA"\nclients = [0]\n',
        "list of client ids": f'[a]\npublic-key = "{key0}"\nclients = ["0"]\n',
        "is not in [0, 2)": f'[a]\npublic-key = "{key0}"\nclients = [2]\n',
        "client 0 is in [a] and [b]": f'[a]\npublic-key = "{key0}"\nclients = [0]\n'
                                      f'[b]\npublic-key = "{key1}"\nclients = [0]\n',
        "public key of another node": f'[a]\npublic-key = "{key0}"\nclients = [0]\n'
                                      f'[b]\npublic-key = "{key0}"\nclients = [1]\n',
    }
    for message, text in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            parse_node_map(text, 2)


def test_certs_writes_node_keys_and_map_and_auth_needs_tls(tiny_cfg, tmp_path, capsys):
    assert cli.main(["flower", "certs", str(tmp_path / "c"), "--nodes", "2", "--clients", "4"]) == 0
    node_map = tomllib.loads((tmp_path / "c" / "nodes.toml").read_text())
    assert {name: entry["clients"] for name, entry in node_map.items()} == {"node-0": [0, 2], "node-1": [1, 3]}
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"ca.pem", "server.pem", "server.key", "node-0.key",
                                                            "node-0.pub", "node-1.key", "node-1.pub"}
    assert cli.main(["flower", "deploy", "configs/tiny.toml", "--auth", "--workdir", str(tmp_path / "w")]) == 2
    assert "--auth needs --tls" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs TLS"):
        Flower(tmp_path / "w2", auth=make_node_keys(tmp_path / "k", 1, 1))
