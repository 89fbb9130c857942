"""The fetch loop's backpressure logic with a scripted consumer (Kafka itself: tests/integration/test_fetch.py)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from catalog.preprocess import DecodeLimits
from consumer.metrics import Metrics
from consumer.source import FetchQueue, InFlight, fetch
from consumer.stream import END

TP = TopicPartition("photos", 0)


def record(offset: int) -> ConsumerRecord:
    return ConsumerRecord(topic=TP.topic, partition=0, offset=offset, timestamp=0, timestamp_type=0, key=None,
                          value=b"not an image", checksum=None, serialized_key_size=0, serialized_value_size=12,
                          headers=[])


class ScriptedConsumer:
    """Serves offsets 0..n-1 from one partition; records what was paused when each poll happened."""

    def __init__(self, n: int, leftover_on_paused_poll: bool = False) -> None:
        self.position, self.n = 0, n
        self._paused: set = set()
        self.polls_paused: list[bool] = []
        self.seeks: list[int] = []
        self.leftover = leftover_on_paused_poll
        self.paused_twice = asyncio.Event()  # set at the second poll made with the partition paused

    def assignment(self):
        return {TP}

    def paused(self):
        return set(self._paused)

    def pause(self, *tps):
        self._paused |= set(tps)

    def resume(self, *tps):
        self._paused -= set(tps)

    def seek(self, tp, offset):
        self.seeks.append(offset)
        self.position = offset

    def highwater(self, tp):
        return self.n

    async def getmany(self, timeout_ms=0, max_records=None):
        self.polls_paused.append(TP in self._paused)
        if sum(self.polls_paused) >= 2:
            self.paused_twice.set()
        if TP in self._paused:
            if not self.leftover:
                return {}
            self.leftover = False  # as if a rebalance ended during this poll: one batch comes back
        count = min(max_records or 32, self.n - self.position)
        if count == 0:
            await asyncio.sleep(timeout_ms / 1000)  # a real consumer waits for data up to timeout_ms
            return {}
        batch = [record(o) for o in range(self.position, self.position + count)]
        self.position += count
        return {TP: batch}


async def drain(consumer: ScriptedConsumer, queue: FetchQueue, n: int, hold_full: asyncio.Event) -> list[int]:
    metrics, stop = Metrics(CollectorRegistry()), asyncio.Event()
    with ThreadPoolExecutor(1) as pool:
        task = asyncio.create_task(fetch(consumer, queue, pool=pool, size=(32, 32), limits=DecodeLimits(), stop=stop,
                                         in_flight=InFlight(metrics), metrics=metrics, max_records=8,
                                         poll_every_s=0.05))
        await hold_full.wait()
        offsets = []
        while len(offsets) < n:
            offsets.append((await asyncio.wait_for(queue.get(), 10)).record.offset)
        stop.set()
        while (item := await asyncio.wait_for(queue.get(), 10)) is not END:
            offsets.append(item.record.offset)
        await task
    return offsets


async def test_a_queue_full_for_long_is_polled_paused_then_resumed_and_nothing_is_lost():
    consumer = ScriptedConsumer(40)
    offsets = await drain(consumer, FetchQueue(maxsize=4), 40, consumer.paused_twice)  # reader waits meanwhile
    assert offsets == list(range(40))
    assert consumer.paused() == set()  # resumed once there was room
    assert not consumer.polls_paused[0] and sum(consumer.polls_paused) >= 2


async def test_records_returned_by_a_paused_poll_are_given_back_not_dropped():
    consumer = ScriptedConsumer(40, leftover_on_paused_poll=True)
    offsets = await drain(consumer, FetchQueue(maxsize=4), 40, consumer.paused_twice)
    assert consumer.seeks == [4]  # the batch after the 4 queued ones came back while paused, and was sought back
    assert offsets == list(range(40))
