"""A record batch the service cannot read, on the real broker: dead-lettered with its offset range
and stepped over, or a clean stop; never a crash loop, never a photo lost on another partition.

The broker accepts and serves the batch (gzip, from an ordinary producer); the service process
is made unable to decode it the way a missing codec library does (aiokafka's codec check says
the library is absent), through a ``sitecustomize`` on its PYTHONPATH. Everything else is real.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka import AIOKafkaProducer

from tests.fault.conftest import Verdict
from tests.kafka import committed, read_until
from tests.photos import store_photos

pytestmark = [pytest.mark.integration, pytest.mark.fault]

GZIP_PHOTOS = 4  # in one batch on partition 0, at offsets 3-6


@pytest.fixture
def without_gzip(tmp_path) -> dict[str, str]:
    folder = tmp_path / "no-gzip"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import aiokafka.codec\naiokafka.codec.has_gzip = lambda: False  # as if its library were missing\n"
    )
    return {"PYTHONPATH": str(folder)}


async def produce_around_a_gzip_batch(bootstrap: str, topic: str) -> dict[int, list[int]]:
    """Partition 0: 3 plain photos, 4 gzip photos in one batch, 2 plain; partitions 1 and 2: 3 plain
    each. Returns the offsets of the plain (readable) photos per partition."""
    photos = [p.read_bytes() for p, _ in store_photos()[:6]]
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    gzip = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type="gzip", linger_ms=500,
                            max_batch_size=4 * 1024 * 1024, max_request_size=4 * 1024 * 1024)
    await plain.start()
    await gzip.start()
    readable: dict[int, list[int]] = {0: [], 1: [], 2: []}
    try:
        for i in range(3):
            readable[0].append((await plain.send_and_wait(topic, photos[i], partition=0)).offset)
        acks = [await gzip.send(topic, photos[i], partition=0) for i in range(GZIP_PHOTOS)]
        offsets = [(await a).offset for a in acks]
        assert offsets == [3, 4, 5, 6]
        for i in range(2):
            readable[0].append((await plain.send_and_wait(topic, photos[i], partition=0)).offset)
        for partition in (1, 2):
            for i in range(3):
                readable[partition].append((await plain.send_and_wait(topic, photos[i], partition=partition)).offset)
    finally:
        await plain.stop()
        await gzip.stop()
    return readable


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_an_unreadable_batch_becomes_one_dead_letter_with_its_range_and_the_rest_flows(
    broker, topics, service, without_gzip, reliability_log, delivery,
):
    readable = await produce_around_a_gzip_batch(broker.bootstrap, topics.input)
    start = time.monotonic()
    svc = service(SHELFMATCH_DELIVERY=delivery, **without_gzip)
    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    svc.wait_ready()
    expected = {f"{topics.input}/{p}/{o}" for p, offsets in readable.items() for o in offsets}
    events = await read_until(broker.bootstrap, topics.output, lambda rs: len(rs) >= len(expected),
                              isolation_level=isolation)
    ids = [json.loads(r.value)["event_id"] for r in events]
    reliability_log.append(Verdict(
        f"unreadable batch (a codec missing here), dead-letter mode, {delivery}", len(expected),
        len(expected - set(ids)), len(ids) - len(set(ids)), round(time.monotonic() - start, 1),
        notes={"unreadable_records": GZIP_PHOTOS, "dead_letters": "1 (offsets 3-6)", "exit": "still running"},
    ))
    assert set(ids) == expected  # none lost, on any partition
    if delivery == "exactly-once":
        assert len(ids) == len(set(ids))  # and none twice
    dead = await read_until(broker.bootstrap, topics.dlq, lambda rs: len(rs) >= 1, isolation_level=isolation)
    assert len(dead) == 1
    headers = {k: v.decode() for k, v in dead[0].headers}
    assert headers["dlq-reason"] == "unreadable-batch"
    assert headers["dlq-source-topic"] == topics.input and headers["dlq-source-partition"] == "0"
    assert (headers["dlq-source-offset"], headers["dlq-source-offset-last"]) == ("3", "6")
    assert "gzip" in headers["dlq-error"]
    assert dead[0].value == b""  # the data stays in the input topic, where a reader with the codec can read it

    def unreadable_counted() -> bool:
        return f'shelfmatch_unreadable_batches_total{{topic="{topics.input}"}} 1.0' in svc.metrics()

    deadline = asyncio.get_running_loop().time() + 30
    while not unreadable_counted():
        assert asyncio.get_running_loop().time() < deadline, svc.metrics()
        await asyncio.sleep(0.2)
    assert svc.proc.poll() is None  # still running: no crash, so no crash loop
    assert svc.terminate() == 0
    offsets = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
    assert offsets == {0: 9, 1: 3, 2: 3}


async def test_stop_mode_commits_what_came_before_and_exits_with_one_line(
    broker, topics, service, without_gzip, reliability_log,
):
    readable = await produce_around_a_gzip_batch(broker.bootstrap, topics.input)
    start = time.monotonic()
    svc = service(SHELFMATCH_ON_UNREADABLE_BATCH="stop", **without_gzip)
    code = svc.wait_exit(timeout_s=120)
    seconds = time.monotonic() - start
    assert code == 1
    log = svc.log()
    lines = [line for line in log.splitlines() if "ERROR" in line and "cannot read" in line]
    assert len(lines) == 1 and f"{topics.input} partition 0 offsets 3-6" in lines[0], log
    assert "Traceback" not in log
    offsets = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
    assert offsets[0] == 3  # the photos before the batch were published and committed; the batch waits
    events = await read_until(broker.bootstrap, topics.output, lambda rs: len(rs) >= 3)
    before = {f"{topics.input}/0/{o}" for o in readable[0][:3]}
    published = {json.loads(r.value)["event_id"] for r in events}
    reliability_log.append(Verdict(
        "unreadable batch (a codec missing here), stop mode", len(before), len(before - published), 0,
        round(seconds, 1),
        notes={"exit": code, "committed_offset_partition_0": offsets[0], "range": "3-6"},
    ))
    assert before <= published
