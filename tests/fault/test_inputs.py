"""Input the other tests do not send: every producer's codec, and odd records, on 48 partitions.

Rows 11 and 13 of the reliability matrix. One service consumes one 48-partition input topic for
the whole module (a start costs more than these tests' photos): the official Java producer writes
gzip, snappy, lz4 and zstd batches to it, aiokafka writes the odd records, and each test checks
its own offsets: one event, or one dead letter with its reason, per record.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.fault.conftest import Verdict, small_photo, wait_for
from tests.kafka import Sent, create_topics, java_produce, produce, read_all, unique
from tests.photos import random_bytes
from tests.service import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 48
CODECS = ["gzip", "snappy", "lz4", "zstd"]
OUTPUT_CODEC = "zstd"  # the service's default SHELFMATCH_COMPRESSION, left unset below


@dataclass(frozen=True)
class Shared:
    service: Service
    input: str
    output: str
    dlq: str


@pytest.fixture(scope="module")
async def shared(broker, fast_catalog, tmp_path_factory):
    topics = Shared(None, unique("photos48"), unique("matches"), unique("dlq"))  # type: ignore[arg-type]
    await create_topics(broker.bootstrap, topics.input, partitions=PARTITIONS)
    await create_topics(broker.bootstrap, topics.output, topics.dlq, partitions=3)
    log = tmp_path_factory.mktemp("inputs") / "service.log"
    svc = Service({
        "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "SHELFMATCH_GROUP_ID": unique("g"),
        "SHELFMATCH_INPUT_TOPIC": topics.input, "SHELFMATCH_OUTPUT_TOPIC": topics.output,
        "SHELFMATCH_DLQ_TOPIC": topics.dlq, "SHELFMATCH_CATALOG": str(fast_catalog), "SHELFMATCH_THRESHOLD": "0.7",
        "SHELFMATCH_BATCH_SIZE": "16", "SHELFMATCH_SESSION_TIMEOUT_MS": "6000",
    }, log).start()
    try:
        svc.wait_ready()
        yield Shared(svc, topics.input, topics.output, topics.dlq)
    finally:
        failed = svc.proc.poll() is not None
        svc.close()
        if failed:
            print(f"--- service log ---\n{svc.log()}")


def outputs_for(sent: list[Sent]):
    """A condition on output records: every sent record has an event or a dead letter."""
    want = {(s.partition, s.offset) for s in sent}

    def done(records) -> bool:
        return want <= {source_of(r) for r in records}

    return done


def source_of(record) -> tuple[int, int]:
    """(partition, offset) of the input record behind an event or a dead letter."""
    headers = dict(record.headers)
    if "dlq-source-offset" in headers:
        return int(headers["dlq-source-partition"]), int(headers["dlq-source-offset"])
    source = json.loads(record.value)["source"]
    return source["partition"], source["offset"]


async def outputs(broker, shared: Shared, sent: list[Sent]) -> tuple[dict, dict]:
    """(events, dead letters) of the sent records, by (partition, offset); fails after a deadline."""
    both = []
    deadline = time.monotonic() + 300
    while not outputs_for(sent)(both):
        assert time.monotonic() < deadline, "not every record has an event or a dead letter"
        assert shared.service.proc.poll() is None, f"the service exited:\n{shared.service.log()}"
        both = await read_all(broker.bootstrap, shared.output, 3) + await read_all(broker.bootstrap, shared.dlq, 3)
    mine = {(s.partition, s.offset) for s in sent}
    events: dict = {}
    dead: dict = {}
    for r in both:
        where = source_of(r)
        if where in mine:
            (dead if r.topic == shared.dlq else events).setdefault(where, []).append(r)
    return events, dead


def lag_series(text: str, topic: str) -> dict[int, float]:
    return {int(p): float(v) for p, v in re.findall(
        rf'^shelfmatch_consumer_lag_records{{partition="(\d+)",topic="{re.escape(topic)}"}} (\S+)$', text, re.M)}


async def test_every_codec_from_the_java_producer_gives_one_event_per_photo(broker, shared, tmp_path, reliability_log):
    photos = [small_photo(i) for i in range(24)]
    start = time.monotonic()
    by_codec = java_produce(broker.bootstrap, shared.input, CODECS, photos, tmp_path)
    everything = [s for sent in by_codec.values() for s in sent]
    events, dead = await outputs(broker, shared, everything)
    seconds = round(time.monotonic() - start, 1)
    stored = broker.batch_codecs(shared.input, PARTITIONS) if broker.started_here else {}
    stored_codecs = Counter(c for codecs in stored.values() for c in codecs)
    for codec, sent in by_codec.items():
        counts = Counter(json.loads(r.value)["event_id"] for s in sent for r in events.get((s.partition, s.offset), []))
        lost = sum(1 for s in sent if s.event_id not in counts)
        reliability_log.append(
            Verdict(
                f"input compressed with {codec} by the Java producer",
                len(sent),
                lost,
                sum(c - 1 for c in counts.values()),
                seconds,
                None,
                {
                    "events": sum(counts.values()),
                    "dead_letters": sum(len(dead.get((s.partition, s.offset), [])) for s in sent),
                    "batches_stored": stored_codecs.get(codec, "not checked"),
                    "held": lost == 0 and sum(counts.values()) == len(sent),
                },
            )
        )
        assert sum(counts.values()) == len(sent) and lost == 0, codec  # events == photos
    assert not dead
    if broker.started_here:  # the batches really were compressed so, and the events are compressed as chosen
        assert set(stored_codecs) == set(CODECS), stored
        out = {c for codecs in broker.batch_codecs(shared.output, 3).values() for c in codecs}
        assert out == {OUTPUT_CODEC}, out
    assert shared.service.proc.poll() is None


async def test_odd_records_each_get_an_event_or_a_reasoned_dead_letter_and_lag_drains(broker, shared, reliability_log):
    """Tombstone, repeated header, binary and 1 MB headers under names we do not read, a 1 MB
    header (and key) we do read, spread with plain photos over all 48 partitions."""
    huge = bytes(range(256)) * 4096  # 1 MiB, not UTF-8
    odd = [  # (value, key, headers, expected: "event" or the dead letter's reason)
        (None, b"cam-tomb", [("camera-id", b"cam-tomb")], "empty"),
        (small_photo(1), None, [("camera-id", b"first"), ("camera-id", b"last")], "event"),
        (small_photo(2), None, [("x-gateway-trace", b"\xff\xfe\x00\x80")], "event"),
        (small_photo(3), None, [("x-gateway-blob", huge)], "event"),
        (random_bytes(), None, [("x-gateway-blob", huge)], "unsupported-format"),
        (small_photo(4), None, [("camera-id", b"c" * 1_048_576)], "bad-header"),
        (small_photo(5), b"k" * 1_048_576, [], "bad-header"),
    ]
    plain = [(small_photo(10 + i), f"cam-{i}".encode(), [], "event") for i in range(2 * PARTITIONS - len(odd))]
    records = odd + plain
    start = time.monotonic()
    sent = await produce(
        broker.bootstrap,
        shared.input,
        [r[0] for r in records],
        keys=[r[1] for r in records],
        headers=[r[2] for r in records],
        partitions=[i % PARTITIONS for i in range(len(records))],
    )
    events, dead = await outputs(broker, shared, sent)
    reasons: Counter = Counter()
    for s, (_, _, headers, expected) in zip(sent, records, strict=True):
        where = (s.partition, s.offset)
        if expected == "event":
            assert len(events.get(where, [])) == 1 and where not in dead, (where, expected)
        else:
            assert len(dead.get(where, [])) == 1 and where not in events, (where, expected)
            letter = dead[where][0]
            assert dict(letter.headers)["dlq-reason"].decode() == expected
            assert list(letter.headers)[: len(headers)] == headers  # originals kept, binary and 1 MB ones too
            reasons[expected] += 1
    repeated = events[(sent[1].partition, sent[1].offset)][0]
    assert json.loads(repeated.value)["photo"]["camera_id"] == "last"  # a repeated header: its last value
    lost = sum(1 for s in sent if (s.partition, s.offset) not in events and (s.partition, s.offset) not in dead)

    # Lag: one series per input partition at most, and each drains to 0 once everything is handled.
    def drained() -> dict[int, float] | None:
        lags = lag_series(shared.service.metrics(), shared.input)
        return lags if len(lags) == PARTITIONS and not any(lags.values()) else None

    lags = wait_for(drained, 60, "every partition's lag at 0")
    reliability_log.append(
        Verdict(
            "odd records on 48 partitions (tombstone, repeated header, binary and 1 MB headers)",
            len(sent),
            lost,
            0,
            round(time.monotonic() - start, 1),
            None,
            {
                "events": sum(len(v) for v in events.values()),
                "dead_letters": dict(reasons),
                "lag_series": len(lags),
                "lag_at_end": int(sum(lags.values())),
            },
        )
    )
    assert lost == 0
    assert shared.service.proc.poll() is None
