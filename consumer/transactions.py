"""Exactly-once delivery: events, dead letters and consumed offsets in one Kafka transaction.

One transactional producer per assigned input partition, with a ``transactional_id`` derived
from the group, topic and partition. When a partition moves in a rebalance its new owner starts
a producer with the same id, which fences the old owner (a zombie that still holds a batch can
no longer commit). aiokafka's transactional offset commit carries no group generation, so this
per-partition id is what provides the fencing (the Faust approach).

Per batch and per input partition, the order is:

1. begin a transaction on that partition's producer;
2. send the partition's events and dead letters;
3. add the batch's next offset for that partition to the transaction;
4. commit the transaction. On a retriable error, abort and retry the same records; when the
   producer is fenced, drop the batch: the partition's new owner re-reads it from the last
   committed offset.

Consumers of the output topic read with ``isolation_level=read_committed`` and see each event
exactly once, even when a consumer is killed mid-batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

from consumer.metrics import Metrics
from consumer.sink import BACKOFF_S, Health, Outcome, degraded, record_delivered

log = logging.getLogger(__name__)


class TransactionalSink:
    """Same interface as :class:`consumer.sink.Sink`, plus partition assignment callbacks."""

    def __init__(self, producer_kwargs: dict, group_id: str, metrics: Metrics, health: Health) -> None:
        self._kwargs = producer_kwargs
        self._group_id = group_id
        self._metrics = metrics
        self._health = health
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"shelfmatch.{self._group_id}.{tp.topic}.{tp.partition}"

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in sorted(partitions):
            if tp not in self._producers:
                producer = AIOKafkaProducer(transactional_id=self.transactional_id(tp), **self._kwargs)
                await producer.start()  # initialises the id: fences any previous owner
                self._producers[tp] = producer

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def start(self) -> None:
        """Producers start per partition, as partitions are assigned."""

    async def stop(self) -> None:
        await self.revoked(set(self._producers))

    async def send(self, outcome: Outcome) -> None:
        """Nothing to do ahead of time: records are sent inside the transaction in :meth:`settle`."""

    async def settle(self, outcome: Outcome) -> None:
        start = time.perf_counter()
        by_partition: dict[TopicPartition, list] = defaultdict(list)
        for r in outcome.records:
            by_partition[r.source].append(r)
        for tp, offset in outcome.offsets.items():
            await self._commit_partition(tp, by_partition.get(tp, []), offset)
        self._metrics.stage.labels("publish").observe(time.perf_counter() - start)
        record_delivered(self._metrics, outcome.records, time.time())

    async def _commit_partition(self, tp: TopicPartition, records: list, offset: int) -> None:
        attempt = 0
        while True:
            producer = self._producers.get(tp)
            if producer is None:
                log.warning("%s is no longer assigned; its new owner re-reads these photos", tp)
                return
            try:
                async with producer.transaction():
                    for r in records:
                        await producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                    await producer.send_offsets_to_transaction({tp: offset}, self._group_id)
            except (ProducerFenced, InvalidProducerEpoch):
                log.warning("producer for %s was fenced by a newer owner; dropping this batch", tp)
                self._metrics.commit_failures.inc()
                await self.revoked({tp})
                return
            except KafkaError as exc:
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                degraded(self._health, self._metrics,
                         f"transaction for {tp} failed ({type(exc).__name__}: {exc}); retrying in {delay:.1f}s")
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self._health.set(publishing=True)
            return
