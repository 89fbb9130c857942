"""Exactly-once sink decisions that a broker cannot easily be made to produce on demand: a producer
that fails to start, a fence while the partition is still ours, a rebalance drain that timed out.
The producer is a scripted stand-in; the broker-level behaviour is covered by tests/fault."""
import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced
from prometheus_client import CollectorRegistry

import consumer.transactions as T
from consumer.delivery import Outcome, OutRecord
from consumer.health import Health
from consumer.metrics import Metrics

TP = TopicPartition("photos", 0)


class ScriptedProducer:
    fail_start = False
    fence = False

    def __init__(self, transactional_id: str, **kwargs) -> None:
        self.transactional_id = transactional_id
        self.committed: list[tuple[list, dict]] = []
        self.stopped = False
        self._sending: list = []

    async def start(self) -> None:
        if ScriptedProducer.fail_start:
            raise KafkaConnectionError("broker unreachable")

    async def stop(self) -> None:
        self.stopped = True

    def transaction(self):
        return self

    async def __aenter__(self):
        self._sending = []
        return self

    async def __aexit__(self, *exc_info):
        if exc_info[0] is None:
            if ScriptedProducer.fence:
                raise ProducerFenced()
            self.committed.append((self._sending, self._offsets))
        return False

    async def send(self, topic, value, key=None, headers=None):
        self._sending.append(value)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def send_offsets_to_transaction(self, offsets, group_id):
        self._offsets = offsets


@pytest.fixture
def sink(monkeypatch):
    monkeypatch.setattr(T, "AIOKafkaProducer", ScriptedProducer)
    monkeypatch.setattr(ScriptedProducer, "fail_start", False)
    monkeypatch.setattr(ScriptedProducer, "fence", False)
    owned: set[TopicPartition] = set()
    registry = CollectorRegistry()
    s = T.TransactionalSink({}, "group", Metrics(registry), Health(), lambda: owned)
    s.owned, s.registry = owned, registry
    return s


def outcome(offset: int = 10) -> Outcome:
    record = OutRecord(source=TP, topic="matches", value=b"event", key=None, headers=[], source_timestamp_ms=0,
                       verdict="match")
    return Outcome(records=[record], offsets={TP: offset}, photos=1)


def matched(sink) -> float:
    return sink.registry.get_sample_value("shelfmatch_photos_total", {"outcome": "matched"}) or 0.0


async def test_a_batch_commits_events_and_offset_in_one_transaction(sink):
    sink.owned.add(TP)
    await sink.assigned({TP})
    await sink.settle(outcome(10))
    (producer,) = sink._producers.values()
    assert producer.committed == [([b"event"], {TP: 10})]
    assert matched(sink) == 1


async def test_a_partition_that_moved_away_is_dropped_and_not_counted(sink):
    await sink.settle(outcome())  # never assigned to this member, no producer
    assert matched(sink) == 0


async def test_a_batch_fetched_before_its_producer_started_waits_for_it(sink, monkeypatch):
    # aiokafka sets the assignment, then calls the listener: records can be fetched, and reach
    # settle, while assigned() is still starting producers. Dropping them would lose photos.
    release = asyncio.Event()
    original = ScriptedProducer.start

    async def slow_start(self):
        await release.wait()
        await original(self)

    monkeypatch.setattr(ScriptedProducer, "start", slow_start)
    sink.owned.add(TP)
    assigning = asyncio.ensure_future(sink.assigned({TP}))
    await asyncio.sleep(0)
    settling = asyncio.ensure_future(sink.settle(outcome(10)))
    for _ in range(50):  # many turns of the event loop: a settle that did not wait would be done
        await asyncio.sleep(0)
    assert not settling.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(assigning, settling), 5)
    assert sink._producers[TP].committed == [([b"event"], {TP: 10})]


async def test_an_owned_partition_whose_producer_failed_to_start_stops_the_service(sink):
    ScriptedProducer.fail_start = True
    sink.owned.add(TP)
    await sink.assigned({TP})  # returns at once: heartbeats wait while the callback runs
    with pytest.raises(T.OwnershipLost, match="failed to start.*KafkaConnectionError"):
        await sink.settle(outcome())


async def test_an_owned_partition_without_a_producer_stops_the_service(sink):
    sink.owned.add(TP)  # assigned, but assigned() never ran for it
    with pytest.raises(T.OwnershipLost, match="still assigned"):
        await sink.settle(outcome())


async def test_a_fence_while_the_partition_is_still_ours_stops_the_service(sink):
    sink.owned.add(TP)
    await sink.assigned({TP})
    producer = sink._producers[TP]
    ScriptedProducer.fence = True
    with pytest.raises(T.OwnershipLost, match="fenced"):
        await sink.settle(outcome())
    assert producer.stopped and matched(sink) == 0


async def test_a_fence_after_the_partition_moved_drops_the_batch(sink):
    sink.owned.add(TP)
    await sink.assigned({TP})
    sink.owned.clear()  # a newer owner has it
    ScriptedProducer.fence = True
    await sink.settle(outcome())
    assert TP not in sink._producers and matched(sink) == 0


async def test_a_fence_during_a_rebalance_drops_the_batch_and_the_service_goes_on(sink):
    # aiokafka still lists the partition as assigned until the rebalance completes.
    sink.owned.add(TP)
    await sink.assigned({TP})
    sink.revoking({TP})
    ScriptedProducer.fence = True
    await sink.settle(outcome())
    assert TP not in sink._producers and matched(sink) == 0


async def test_a_drain_timeout_during_a_transaction_aborts_it(sink, monkeypatch):
    acked = asyncio.get_running_loop().create_future()

    async def send(self, topic, value, key=None, headers=None):
        self._sending.append(value)
        return acked

    monkeypatch.setattr(ScriptedProducer, "send", send)
    sink.owned.add(TP)
    await sink.assigned({TP})
    producer = sink._producers[TP]
    settling = asyncio.ensure_future(sink.settle(outcome()))
    for _ in range(20):  # the transaction is open, waiting for the acknowledgement
        await asyncio.sleep(0)
    await sink.drain_timed_out({TP})
    acked.set_result(None)
    with pytest.raises(T.OwnershipLost, match="drain timed out"):
        await settling
    assert producer.committed == []


async def test_after_a_drain_timeout_nothing_more_commits(sink):
    sink.owned.add(TP)
    await sink.assigned({TP})
    producer = sink._producers[TP]
    await sink.drain_timed_out({TP})
    await sink.assigned({TP})  # the partition comes back to this member
    assert sink._producers[TP] is producer  # no new producer fences the batches in flight
    with pytest.raises(T.OwnershipLost, match="drain timed out"):
        await sink.settle(outcome())
    assert producer.committed == []
