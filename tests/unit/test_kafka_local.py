"""The local broker launcher's pure parts (it is a script without a .py suffix, so it is loaded by path)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import uuid

from tests.kafka import KAFKA_LOCAL


def load_launcher():
    loader = importlib.machinery.SourceFileLoader("kafka_local", str(KAFKA_LOCAL))
    spec = importlib.util.spec_from_loader("kafka_local", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_cluster_ids_never_start_with_a_dash(monkeypatch):
    """A leading "-" made kafka-storage read the id as a flag and fail to format (one start in 64)."""
    launcher = load_launcher()
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x00" * 15 + b"\x01")])
    monkeypatch.setattr(launcher.uuid, "uuid4", lambda: next(draws))
    assert uuid.UUID(bytes=b"\xf8" + bytes(15)).bytes[0] >> 2 == 62  # base64url's 62nd symbol is "-"
    cid = launcher.new_cluster_id()
    assert cid == "AAAAAAAAAAAAAAAAAAAAAQ"  # the second draw: the first was skipped


def test_cluster_ids_are_22_url_safe_characters():
    launcher = load_launcher()
    ids = {launcher.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert all(len(i) == 22 and set(i) <= alphabet and not i.startswith("-") for i in ids)


def test_the_mtls_listener_requires_client_certificates_of_the_client_ca():
    launcher = load_launcher()
    state = {"port": 1, "controller_port": 2, "workdir": "/w",
             "mtls": {"port": 3, "keystore": "/w/broker.p12", "store_password": "pw", "cafile": "/w/ca.pem",
                      "client_ca": "/w/client-ca.pem", "client_cert": "/w/client.pem", "client_key": "/w/client.key"}}
    props = dict(line.split("=", 1) for line in launcher.server_properties(state).splitlines())
    assert "SSL://127.0.0.1:3" in props["listeners"].split(",")
    assert "SSL://127.0.0.1:3" in props["advertised.listeners"].split(",")
    assert "SSL:SSL" in props["listener.security.protocol.map"].split(",")
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert props["listener.name.ssl.ssl.truststore.location"] == "/w/client-ca.pem"
    assert props["listener.name.ssl.ssl.truststore.type"] == "PEM"
    without = launcher.server_properties({k: v for k, v in state.items() if k != "mtls"})
    assert "ssl.client.auth" not in without and "SSL://" not in without
