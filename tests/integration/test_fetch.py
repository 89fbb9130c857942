"""The fetch stage against the real broker: backpressure from a full queue, without the model."""
from __future__ import annotations

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import FetchResult, PartitionRecords
from prometheus_client import CollectorRegistry

from catalog.preprocess import DecodeLimits
from consumer.metrics import Metrics
from consumer.source import FetchQueue, InFlight, fetch
from consumer.stream import END
from tests import photos as P
from tests.kafka import produce

pytestmark = pytest.mark.integration


async def test_a_full_queue_neither_loses_records_nor_drops_what_aiokafka_has_fetched(broker, topics, monkeypatch):
    """Pausing a partition makes aiokafka drop its fetched, unconsumed response (refetched after
    resume) inside a reference cycle that only the cyclic collector frees: with full-HD frames this
    held hundreds of MB between collections. Backpressure must wait instead, and lose nothing.

    A dropped response is a PartitionRecords that nothing but its own generator refers to: with
    the collector off, it stays alive, so it is counted through a weak reference."""
    created: list[weakref.ref] = []
    init = PartitionRecords.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(weakref.ref(self))

    monkeypatch.setattr(PartitionRecords, "__init__", tracked_init)
    photos = [path.read_bytes() for path, _ in P.store_photos()]
    n = 600
    sent = await produce(broker.bootstrap, topics.input, [photos[i % len(photos)] for i in range(n)])
    consumer = AIOKafkaConsumer(topics.input, bootstrap_servers=broker.bootstrap, group_id=topics.group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    queue = FetchQueue(maxsize=4)  # far smaller than one fetch response
    stop, metrics = asyncio.Event(), Metrics(CollectorRegistry())
    got = []
    gc.collect()
    gc.disable()  # so that every dropped response is still there to be counted at the end
    try:
        with ThreadPoolExecutor(2) as pool:
            task = asyncio.create_task(fetch(consumer, queue, pool=pool, size=(224, 224), limits=DecodeLimits(),
                                             stop=stop, in_flight=InFlight(metrics), metrics=metrics, max_records=32,
                                             poll_every_s=60))
            while len(got) < n:
                item = await asyncio.wait_for(queue.get(), timeout=60)
                await item.decoded  # decoding is slower than fetching: the queue stays full
                got.append(item.record)
            stop.set()
            while (item := await asyncio.wait_for(queue.get(), timeout=60)) is not END:
                got.append(item.record)
            await task
        held = {id(r._partition_records) for r in consumer._fetcher._records.values() if isinstance(r, FetchResult)}
        dropped = [pr for ref in created if (pr := ref()) is not None and id(pr) not in held]
        n_created = len(created)
    finally:
        gc.enable()
        await consumer.stop()
    assert sorted((r.partition, r.offset) for r in got) == sorted((s.partition, s.offset) for s in sent)
    assert n_created > 3  # several responses per partition, so the queue was full many times
    assert len(dropped) == 0
