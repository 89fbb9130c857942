"""Least privilege (row 12 of the reliability matrix): a broker with its standard authorizer.

A private broker from ``scripts/kafka-local start --sasl ... --acls`` (KRaft's StandardAuthorizer,
SCRAM users over SASL_SSL, no access without an ACL). Each case is one SCRAM user granted exactly
``consumer.acls.required_acls`` for its delivery mode, or that set less one ACL.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from consumer.acls import required_acls
from consumer.settings import Settings
from tests.fault.conftest import Verdict, small_photo, wait_for
from tests.kafka import KAFKA_LOCAL, ROOT, committed, create_topics, produce, read_until, unique
from tests.service import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault]

USERS = ("exact-alo", "exact-eos", "no-write-alo", "no-write-eos", "no-read")
PASSWORD = "pw-" + os.urandom(6).hex()
PHOTOS = 24


@pytest.fixture(scope="module")
def authorized_broker():
    """A second local broker: PLAINTEXT (the super user, for administration) and SASL_SSL users."""
    env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(ROOT / ".cache" / "kafka" / f"acls-{os.getpid()}.json")}
    users = [arg for user in USERS for arg in ("--sasl", f"{user}:{PASSWORD}")]
    out = subprocess.run([str(KAFKA_LOCAL), "start", *users, "--acls"], env=env, check=True, stdout=subprocess.PIPE,
                         text=True).stdout.strip().splitlines()
    info = dict(line.split("=", 1) for line in out if "=" in line)
    yield {"plaintext": out[-1], "sasl_ssl": info["sasl_ssl"], "cafile": info["cafile"], "env": env}
    subprocess.run([str(KAFKA_LOCAL), "stop"], env=env, check=False)


@pytest.fixture
def case(authorized_broker, fast_catalog, tmp_path, request):
    """Factory: topics, a group, photos and ACLs for one user (the documented set, or that set
    without the ACL on the ``output`` or ``input`` topic), and its service; (settings, sent, service)."""
    started: list[Service] = []

    async def make(user: str, delivery: str, *, without: str | None = None):
        plain = authorized_broker["plaintext"]
        settings = Settings(input_topic=unique("in"), output_topic=unique("out"), dlq_topic=unique("dlq"),
                            group_id=unique("g"), delivery=delivery)
        await create_topics(plain, settings.input_topic, partitions=3)
        await create_topics(plain, settings.output_topic, settings.dlq_topic)
        left_out = {"output": ("WRITE", settings.output_topic), "input": ("READ", settings.input_topic)}.get(without)
        acls = [a for a in required_acls(settings) if (a.operation, a.name) != left_out]
        assert len(acls) == len(required_acls(settings)) - (without is not None), "the ACL to leave out must exist"
        specs = [f"User:{user},{a.operation},{a.resource_type},{a.name},{a.pattern}" for a in acls]
        await asyncio.to_thread(subprocess.run, [str(KAFKA_LOCAL), "acl", *specs], env=authorized_broker["env"],
                                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sent = await produce(plain, settings.input_topic, [small_photo(i) for i in range(PHOTOS)])
        svc = Service({
            "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": authorized_broker["sasl_ssl"],
            "SHELFMATCH_SECURITY_PROTOCOL": "SASL_SSL", "SHELFMATCH_SASL_USERNAME": user,
            "SHELFMATCH_SASL_PASSWORD": PASSWORD, "SHELFMATCH_SSL_CAFILE": authorized_broker["cafile"],
            "SHELFMATCH_INPUT_TOPIC": settings.input_topic, "SHELFMATCH_OUTPUT_TOPIC": settings.output_topic,
            "SHELFMATCH_DLQ_TOPIC": settings.dlq_topic, "SHELFMATCH_GROUP_ID": settings.group_id,
            "SHELFMATCH_DELIVERY": delivery, "SHELFMATCH_CATALOG": str(fast_catalog), "SHELFMATCH_BATCH_SIZE": "8",
            "SHELFMATCH_THRESHOLD": "0.7",
            "SHELFMATCH_PUBLISH_TIMEOUT_MS": "2000", "SHELFMATCH_SESSION_TIMEOUT_MS": "6000",
        }, tmp_path / f"{user}.log").start()
        started.append(svc)
        return settings, sent, svc

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for svc in started:
        svc.close()
        if failed:
            print(f"--- {svc.log_path.name} ---\n{svc.log()}")


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_exactly_the_documented_acls_are_enough(authorized_broker, case, reliability_log, delivery):
    user = "exact-alo" if delivery == "at-least-once" else "exact-eos"
    start = time.monotonic()
    settings, sent, svc = await case(user, delivery)
    level = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    records = await read_until(authorized_broker["plaintext"], settings.output_topic,
                               lambda rs: len({json.loads(r.value)["event_id"] for r in rs}) >= len(sent),
                               timeout_s=120, isolation_level=level)
    ids = [json.loads(r.value)["event_id"] for r in records]
    lost = len({s.event_id for s in sent} - set(ids))
    assert svc.terminate() == 0
    done = await committed(authorized_broker["plaintext"], settings.group_id, settings.input_topic, 3)
    reliability_log.append(Verdict(
        f"ACLs: exactly the documented set, {delivery}", len(sent), lost, len(ids) - len(set(ids)),
        round(time.monotonic() - start, 1), None,
        {"acls": len(required_acls(settings)), "committed": sum(v or 0 for v in done.values())}))
    assert lost == 0 and len(ids) == len(sent)
    assert sum(v or 0 for v in done.values()) == len(sent)  # and the group committed every photo


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_without_write_on_the_output_readiness_drops_nothing_commits_and_the_log_names_the_acl(
        authorized_broker, case, reliability_log, delivery):
    user = "no-write-alo" if delivery == "at-least-once" else "no-write-eos"
    start = time.monotonic()
    settings, sent, svc = await case(user, delivery, without="output")
    expected = f"lacks the ACL WRITE on TOPIC '{settings.output_topic}'"
    wait_for(lambda: expected in svc.log() or svc.proc.poll() is not None, 120, "the log naming the missing ACL")
    assert svc.proc.poll() is None, "no exit, no crash loop: it recovers once the ACL is granted"
    wait_for(lambda: svc.get("/readyz")[0] == 503, 60, "readiness dropping")
    done = await committed(authorized_broker["plaintext"], settings.group_id, settings.input_topic, 3)
    reliability_log.append(Verdict(
        f"ACLs: no WRITE on the output topic, {delivery}", len(sent), 0, 0, round(time.monotonic() - start, 1), None,
        {"readyz": 503, "committed": sum(v or 0 for v in done.values()), "log": expected,
         "held": all(v is None for v in done.values())}))
    assert all(v is None for v in done.values()), f"offsets moved while nothing could be published: {done}"


async def test_without_read_on_the_input_it_exits_with_one_clear_line(authorized_broker, case, reliability_log):
    start = time.monotonic()
    settings, sent, svc = await case("no-read", "at-least-once", without="input")
    code = svc.wait_exit(timeout_s=120)
    expected = f"lacks the ACL READ on TOPIC '{settings.input_topic}'"
    reliability_log.append(Verdict(
        "ACLs: no READ on the input topic", len(sent), 0, 0, round(time.monotonic() - start, 1), None,
        {"exit_code": code, "log": expected, "held": code == 1 and expected in svc.log()}))
    assert code == 1
    assert any(line.endswith(expected + "; grant it (README, Access control)") for line in svc.log().splitlines())
