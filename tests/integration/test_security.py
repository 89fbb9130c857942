"""SASL_SSL with SCRAM-SHA-512 and TLS verification, and mutual TLS (client certificates), against a
broker with secured listeners."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.kafka import KAFKA_LOCAL, ROOT, create_topics, produce, read_until, unique
from tests.photos import store_photos

pytestmark = pytest.mark.integration

PASSWORD = "pw-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory):
    """A second local broker with a SASL_SSL listener and a SCRAM user, and an SSL listener that
    requires client certificates (ssl.client.auth=required; certificates made at start)."""
    env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(ROOT / ".cache" / "kafka" / f"sasl-{os.getpid()}.json")}
    out = subprocess.run([str(KAFKA_LOCAL), "start", "--sasl", f"shelfmatch:{PASSWORD}", "--mtls"], env=env,
                         check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    info = dict(line.split("=", 1) for line in out if "=" in line)
    other_ca = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    subprocess.run(["keytool", "-genkeypair", "-alias", "x", "-keyalg", "RSA", "-dname", "CN=localhost",
                    "-keystore", str(other_ca.with_suffix(".p12")), "-storetype", "PKCS12", "-storepass", "changeit",
                    "-keypass", "changeit"], check=True, capture_output=True)
    subprocess.run(["keytool", "-exportcert", "-alias", "x", "-keystore", str(other_ca.with_suffix(".p12")),
                    "-storepass", "changeit", "-rfc", "-file", str(other_ca)], check=True, capture_output=True)
    stranger = tmp_path_factory.mktemp("stranger")  # a client certificate of a CA the broker does not trust
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=shelfmatch",
                    "-keyout", str(stranger / "client.key"), "-out", str(stranger / "client.pem")],
                   check=True, capture_output=True)
    yield {"plaintext": out[-1], "sasl_ssl": info["sasl_ssl"], "cafile": info["cafile"], "other_ca": str(other_ca),
           "ssl": info["ssl"], "client_cert": info["client_cert"], "client_key": info["client_key"],
           "stranger_cert": str(stranger / "client.pem"), "stranger_key": str(stranger / "client.key")}
    subprocess.run([str(KAFKA_LOCAL), "stop"], env=env, check=False)


def secured(broker: dict, **overrides) -> dict:
    return {
        "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker["sasl_ssl"],
        "SHELFMATCH_SECURITY_PROTOCOL": "SASL_SSL",
        "SHELFMATCH_SASL_MECHANISM": "SCRAM-SHA-512",
        "SHELFMATCH_SASL_USERNAME": "shelfmatch",
        "SHELFMATCH_SASL_PASSWORD": PASSWORD,
        "SHELFMATCH_SSL_CAFILE": broker["cafile"],
        **overrides,
    }


async def stream_through(broker: dict, service, security: dict):
    """Six photos in over the plaintext listener, through a service connected with `security`, and
    their six events out; returns the service."""
    plain = broker["plaintext"]
    topics = {k: unique(k) for k in ("in", "out", "dlq")}
    await create_topics(plain, *topics.values())
    sent = await produce(plain, topics["in"], [p.read_bytes() for p, _ in store_photos()[:6]])
    svc = service(**security, SHELFMATCH_INPUT_TOPIC=topics["in"], SHELFMATCH_OUTPUT_TOPIC=topics["out"],
                  SHELFMATCH_DLQ_TOPIC=topics["dlq"], SHELFMATCH_GROUP_ID=unique("g"))
    svc.wait_ready()
    records = await read_until(plain, topics["out"], lambda rs: len(rs) >= len(sent))
    assert {json.loads(r.value)["event_id"] for r in records} == {s.event_id for s in sent}
    return svc


async def test_good_credentials_and_ca_work_end_to_end(secured_broker, service):
    svc = await stream_through(secured_broker, service, secured(secured_broker))
    assert PASSWORD not in svc.log()


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"SHELFMATCH_SASL_PASSWORD": "not-the-password"}, "SaslAuthenticationFailed"),
        ({"SHELFMATCH_SASL_USERNAME": "nobody"}, "SaslAuthenticationFailed"),
        ({"SHELFMATCH_SSL_CAFILE": "OTHER_CA"}, "CERTIFICATE_VERIFY_FAILED"),
    ],
    ids=["wrong-password", "unknown-user", "wrong-ca"],
)
def test_bad_credentials_or_ca_fail_closed_with_a_clear_error(secured_broker, service, overrides, reason):
    if overrides.get("SHELFMATCH_SSL_CAFILE") == "OTHER_CA":
        overrides = {"SHELFMATCH_SSL_CAFILE": secured_broker["other_ca"]}
    svc = service(**secured(secured_broker, **overrides))
    code = svc.wait_exit(timeout_s=120)
    log = svc.log()
    assert code == 2  # fails closed, as a configuration error: no consuming, no publishing, no retry loop
    assert reason in log  # the broker's own answer, as aiokafka logs it
    assert "cannot connect to Kafka" in log and "SHELFMATCH_SECURITY_PROTOCOL" in log  # what to check
    assert "Traceback" not in log
    assert PASSWORD not in log and "not-the-password" not in log


def mutual_tls(broker: dict, **overrides) -> dict:
    return {
        "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker["ssl"],
        "SHELFMATCH_SECURITY_PROTOCOL": "SSL",
        "SHELFMATCH_SSL_CAFILE": broker["cafile"],
        "SHELFMATCH_SSL_CERTFILE": broker["client_cert"],
        "SHELFMATCH_SSL_KEYFILE": broker["client_key"],
        **overrides,
    }


async def test_a_client_certificate_works_end_to_end(secured_broker, service):
    """The listener has ssl.client.auth=required: only a certificate of the trusted client CA gets in."""
    await stream_through(secured_broker, service, mutual_tls(secured_broker))


@pytest.mark.parametrize("client", ["none", "untrusted-ca"])
def test_no_or_an_untrusted_client_certificate_fails_closed_with_a_clear_error(secured_broker, service, client):
    env = mutual_tls(secured_broker, SHELFMATCH_SSL_CERTFILE=secured_broker["stranger_cert"],
                     SHELFMATCH_SSL_KEYFILE=secured_broker["stranger_key"])
    if client == "none":
        del env["SHELFMATCH_SSL_CERTFILE"], env["SHELFMATCH_SSL_KEYFILE"]
    svc = service(**env)
    code = svc.wait_exit(timeout_s=120)
    log = svc.log()
    assert code == 2  # the broker closes the handshake; the service stops as for a configuration error
    assert "cannot connect to Kafka" in log and "SHELFMATCH_SSL_CERTFILE" in log  # what to check
    assert "Traceback" not in log


def test_a_key_that_is_not_the_certificates_fails_before_connecting(secured_broker, service):
    svc = service(**mutual_tls(secured_broker, SHELFMATCH_SSL_KEYFILE=secured_broker["stranger_key"]))
    code = svc.wait_exit(timeout_s=120)
    log = svc.log()
    assert code == 2 and "cannot load the TLS files" in log and "Traceback" not in log
