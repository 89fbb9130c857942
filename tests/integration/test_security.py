"""SASL_SSL with SCRAM-SHA-512 and TLS verification, against a broker with a secured listener."""
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
    """A second local broker with a SASL_SSL listener and a SCRAM user (certificates made at start)."""
    env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(ROOT / ".cache" / "kafka" / f"sasl-{os.getpid()}.json")}
    out = subprocess.run([str(KAFKA_LOCAL), "start", "--sasl", f"shelfmatch:{PASSWORD}"], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    info = dict(line.split("=", 1) for line in out if "=" in line)
    other_ca = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    subprocess.run(["keytool", "-genkeypair", "-alias", "x", "-keyalg", "RSA", "-dname", "CN=localhost",
                    "-keystore", str(other_ca.with_suffix(".p12")), "-storetype", "PKCS12", "-storepass", "changeit",
                    "-keypass", "changeit"], check=True, capture_output=True)
    subprocess.run(["keytool", "-exportcert", "-alias", "x", "-keystore", str(other_ca.with_suffix(".p12")),
                    "-storepass", "changeit", "-rfc", "-file", str(other_ca)], check=True, capture_output=True)
    yield {"plaintext": out[-1], "sasl_ssl": info["sasl_ssl"], "cafile": info["cafile"], "other_ca": str(other_ca)}
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


async def test_good_credentials_and_ca_work_end_to_end(secured_broker, service):
    plain = secured_broker["plaintext"]
    topics = {k: unique(k) for k in ("in", "out", "dlq")}
    await create_topics(plain, *topics.values())
    sent = await produce(plain, topics["in"], [p.read_bytes() for p, _ in store_photos()[:6]])
    svc = service(**secured(secured_broker, SHELFMATCH_INPUT_TOPIC=topics["in"], SHELFMATCH_OUTPUT_TOPIC=topics["out"],
                            SHELFMATCH_DLQ_TOPIC=topics["dlq"], SHELFMATCH_GROUP_ID=unique("g")))
    svc.wait_ready()
    records = await read_until(plain, topics["out"], lambda rs: len(rs) >= len(sent))
    assert {json.loads(r.value)["event_id"] for r in records} == {s.event_id for s in sent}
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
