"""At-least-once sink decisions on a failed delivery, with a scripted producer and consumer: what is
sent again, when the producer is renewed, that offsets are committed only after every record is
acknowledged. The broker-level behaviour is covered by tests/integration and tests/fault."""
import asyncio
from typing import ClassVar

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
)
from prometheus_client import CollectorRegistry

import consumer.delivery as D
import consumer.sink as S
from consumer.delivery import Outcome, OutRecord
from consumer.health import Health
from consumer.metrics import Metrics

TP = TopicPartition("photos", 0)


class ScriptedProducer:
    """Acknowledges every record, except that ``plan`` (shared by all instances) may name, per
    record value, a list of steps for its successive attempts: an error fails the record's future,
    ``("raise", error)`` makes send() itself raise, as for a topic without metadata."""

    plan: ClassVar[dict[bytes, list]] = {}
    instances: ClassVar[list["ScriptedProducer"]] = []

    def __init__(self, **kwargs) -> None:
        self.sent: list[bytes] = []
        self.stopped = False
        ScriptedProducer.instances.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic, value, key=None, headers=None):
        future = asyncio.get_running_loop().create_future()
        steps = ScriptedProducer.plan.get(value, [])
        step = steps.pop(0) if steps else None
        if isinstance(step, tuple):  # ("raise", error): send() itself fails, as for missing metadata
            raise step[1]
        self.sent.append(value)
        if step is None:
            future.set_result(None)
        else:
            future.set_exception(step)
        return future


class ScriptedConsumer:
    def __init__(self) -> None:
        self.commits: list[dict] = []
        self.refuse = False

    async def commit(self, offsets) -> None:
        if self.refuse:
            raise CommitFailedError("rebalanced")
        self.commits.append(dict(offsets))


@pytest.fixture
def sink(monkeypatch):
    monkeypatch.setattr(S, "AIOKafkaProducer", ScriptedProducer)
    monkeypatch.setattr(D, "BACKOFF_S", (0.0,))
    monkeypatch.setattr(ScriptedProducer, "plan", {})
    monkeypatch.setattr(ScriptedProducer, "instances", [])
    registry = CollectorRegistry()
    health = Health()
    s = S.AtLeastOnceSink({}, ScriptedConsumer(), Metrics(registry), health, timeout_s=5.0)
    s.registry, s.health = registry, health
    return s


def records(*values: bytes, dead_letter: bool = False) -> list[OutRecord]:
    return [
        OutRecord(source=TP, topic="dlq" if dead_letter else "matches", value=v, key=None, headers=[],
                  source_timestamp_ms=0, verdict=None if dead_letter else "match",
                  dead_letter="corrupt-image" if dead_letter else None)
        for v in values
    ]


async def deliver(sink, outcome: Outcome) -> None:
    await sink.start()
    await sink.send(outcome)
    await sink.settle(outcome)


def sample(sink, name: str, **labels) -> float:
    return sink.registry.get_sample_value(name, labels) or 0.0


async def test_only_the_records_that_failed_are_sent_again_and_offsets_wait_for_them(sink):
    ScriptedProducer.plan = {b"b": [KafkaConnectionError(), NotLeaderForPartitionError()]}
    outcome = Outcome(records=records(b"a", b"b", b"c"), offsets={TP: 3}, photos=3)
    await deliver(sink, outcome)
    producer = ScriptedProducer.instances[0]
    assert producer.sent == [b"a", b"b", b"c", b"b", b"b"]  # b twice more, a and c never again
    assert sink._consumer.commits == [{TP: 3}]  # one commit, after b's acknowledgement
    assert sample(sink, "shelfmatch_publish_retries_total") == 2
    assert sample(sink, "shelfmatch_photos_total", outcome="matched") == 3
    assert sink.health.publishing  # recovered once acknowledged
    assert len(ScriptedProducer.instances) == 1  # a connection error needs no new producer


async def test_records_after_a_send_that_raised_are_sent_on_the_retry(sink):
    ScriptedProducer.plan = {b"b": [("raise", KafkaTimeoutError())]}  # e.g. no metadata for the topic
    outcome = Outcome(records=records(b"a", b"b", b"c"), offsets={TP: 3}, photos=3)
    await deliver(sink, outcome)
    assert ScriptedProducer.instances[0].sent == [b"a", b"b", b"c"]  # c waited for b's retry
    assert sink._consumer.commits == [{TP: 3}]


async def test_a_dead_letter_refused_as_too_large_goes_again_without_the_photo_on_a_new_producer(sink):
    ScriptedProducer.plan = {b"photo-bytes": [MessageSizeTooLargeError()]}
    outcome = Outcome(records=records(b"photo-bytes", dead_letter=True), offsets={TP: 1}, photos=1)
    await deliver(sink, outcome)
    first, renewed = ScriptedProducer.instances
    assert first.stopped and first.sent == [b"photo-bytes"]
    assert renewed.sent == [b""]  # the copy without the value
    assert dict(outcome.records[0].headers)[D.TRUNCATED_FROM] == b"11"
    assert sample(sink, "shelfmatch_publish_retries_total") == 0  # no back-off: the retry differs
    assert sample(sink, "shelfmatch_dead_letters_total", reason="corrupt-image") == 1
    assert sink._consumer.commits == [{TP: 1}]


async def test_an_error_that_is_not_kafkas_is_raised_not_retried(sink):
    ScriptedProducer.plan = {b"a": [ValueError("serializer bug")]}
    outcome = Outcome(records=records(b"a"), offsets={TP: 1}, photos=1)
    with pytest.raises(ValueError, match="serializer bug"):
        await deliver(sink, outcome)
    assert sink._consumer.commits == []


async def test_a_refused_commit_is_counted_and_the_next_batch_goes_on(sink):
    sink._consumer.refuse = True
    await deliver(sink, Outcome(records=records(b"a"), offsets={TP: 1}, photos=1))
    assert sample(sink, "shelfmatch_commit_failures_total") == 1
    sink._consumer.refuse = False
    second = Outcome(records=records(b"b"), offsets={TP: 2}, photos=1)
    await sink.send(second)
    await sink.settle(second)
    assert sink._consumer.commits == [{TP: 2}]
