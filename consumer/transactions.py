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
4. wait until the broker has acknowledged every record (aiokafka would commit a transaction
   without a record the broker refused), then commit the transaction.

On an error, abort and retry the same records (a dead letter refused as too large goes again
without the photo's bytes, as in consumer.sink); when the producer is fenced, drop the batch:
the partition's new owner re-reads it from the last committed offset.

Consumers of the output topic read with ``isolation_level=read_committed`` and see each event
exactly once, even when a consumer is killed mid-batch.

When this member can no longer tell which producer may commit a partition's batches, it stops
with an error instead of guessing (the restart resumes from the committed offsets, and whatever
it had not committed is aborted, so readers see nothing twice):

- a partition it still owns has no producer, its producer failed to start (aiokafka only logs
  errors raised in a rebalance callback), or its producer was fenced: carrying on would skip its
  photos;
- a rebalance drain timed out: batches fetched under the old assignment are still on their way,
  and if a partition comes back to this member they would commit on its new producer next to
  the same photos fetched again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

from consumer.acls import missing_acl
from consumer.metrics import Metrics
from consumer.sink import (
    BACKOFF_S, RENEW_PRODUCER_ERRORS, Health, Outcome, degraded, record_delivered, shrink_refused,
)

log = logging.getLogger(__name__)


class OwnershipLost(RuntimeError):
    """This member cannot commit a partition's batches safely any more; the service must restart."""


class TransactionalSink:
    """Same interface as :class:`consumer.sink.Sink`, plus partition assignment callbacks.

    ``assignment`` returns the partitions this member owns now (the consumer's ``assignment``).
    """

    def __init__(
        self, producer_kwargs: dict, group_id: str, metrics: Metrics, health: Health,
        assignment: Callable[[], set[TopicPartition]],
    ) -> None:
        self._kwargs = producer_kwargs
        self._group_id = group_id
        self._metrics = metrics
        self._health = health
        self._assignment = assignment
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._started: dict[TopicPartition, asyncio.Task] = {}  # each producer's start()
        self._revoking: set[TopicPartition] = set()  # being given up in the rebalance under way
        self._lost: str | None = None  # why this member must stop, once it must

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"shelfmatch.{self._group_id}.{tp.topic}.{tp.partition}"

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """Start a producer per new partition (which fences any previous owner's). aiokafka may
        fetch a partition before this returns, so settle() waits for its producer's start."""
        self._revoking.clear()
        if self._lost is not None:
            return  # no new producer may fence the batches in flight: settle() stops the service
        for tp in sorted(partitions - set(self._producers)):
            self._start_producer(tp)  # not awaited here: heartbeats wait while this callback runs

    def _start_producer(self, tp: TopicPartition) -> None:
        producer = AIOKafkaProducer(transactional_id=self.transactional_id(tp), **self._kwargs)
        self._producers[tp] = producer
        started = self._started[tp] = asyncio.ensure_future(producer.start())
        started.add_done_callback(
            lambda task: task.cancelled() or task.exception() is None
            or log.error("transactional producer of %s failed to start: %r", tp, task.exception()))

    def revoking(self, partitions: set[TopicPartition]) -> None:
        """A rebalance began: these partitions may move, and a fence on them is expected."""
        self._revoking |= partitions

    async def _renew_producer(self, tp: TopicPartition) -> None:
        """After a refused record the producer's sequence numbers are ahead of the broker's, and
        aiokafka does not reset them: a new producer with the same id starts clean (a new epoch)."""
        await self.revoked({tp})
        self._start_producer(tp)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            producer, started = self._producers.pop(tp, None), self._started.pop(tp, None)
            if started is not None:
                with contextlib.suppress(Exception):
                    await started
            if producer is not None:
                await producer.stop()

    async def drain_timed_out(self, partitions: set[TopicPartition]) -> None:
        """A rebalance gave these partitions up before their batches were committed. Their
        producers are left alone (stopping one inside a transaction can hang) and the next
        settle stops the service."""
        self._lost = f"a rebalance drain timed out with batches of {sorted(partitions)} still in flight"
        log.error("%s; stopping so that a restart resumes from the committed offsets", self._lost)

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
        delivered = []
        for tp, offset in outcome.offsets.items():
            if await self._commit_partition(tp, by_partition.get(tp, []), offset):
                delivered += by_partition.get(tp, [])
        self._metrics.stage.labels("publish").observe(time.perf_counter() - start)
        record_delivered(self._metrics, delivered, time.time())

    def _moving(self, tp: TopicPartition) -> bool:
        """True when the partition is being given up or already belongs to another member."""
        return tp in self._revoking or tp not in self._assignment()

    def _check_owner(self, tp: TopicPartition, why: str) -> None:
        """Dropping a batch is right only when its partition moves to another member. A fence
        outside a rebalance we know of (a transaction that outlived transaction.timeout.ms, or an
        eviction not yet noticed) stops the service: the restart rejoins and re-reads."""
        if self._lost is not None:
            raise OwnershipLost(self._lost)
        if not self._moving(tp):
            raise OwnershipLost(f"{tp} is still assigned to this member but {why}")

    async def _commit_partition(self, tp: TopicPartition, records: list, offset: int) -> bool:
        """Commit one partition's share of a batch; False when it was dropped (moved away)."""
        attempt = 0
        while True:
            if self._lost is not None:
                raise OwnershipLost(self._lost)
            producer = self._producers.get(tp)
            if producer is None:
                self._check_owner(tp, "has no transactional producer")
                log.warning("%s is no longer assigned; its new owner re-reads these photos", tp)
                return False
            try:
                await self._started[tp]
            except Exception as exc:
                raise OwnershipLost(f"the transactional producer of {tp} failed to start ({exc!r})") from exc
            futures = []
            try:
                async with producer.transaction():
                    for r in records:
                        futures.append(await producer.send(r.topic, r.value, key=r.key, headers=r.headers))
                    await producer.send_offsets_to_transaction({tp: offset}, self._group_id)
                    # aiokafka commits a transaction even when one of its records was refused (say,
                    # too large for its topic): that record would be lost. So every record must be
                    # acknowledged first; a refusal raises here, which aborts the transaction.
                    if futures:
                        await asyncio.wait(futures)
                        for f in futures:
                            if f.exception() is not None:
                                raise f.exception()
                    if self._lost is not None:  # the drain timed out meanwhile: abort, do not commit
                        raise OwnershipLost(self._lost)
            except (ProducerFenced, InvalidProducerEpoch):
                self._metrics.commit_failures.inc()
                await self.revoked({tp})
                self._check_owner(tp, "its producer was fenced (a transaction outlived transaction.timeout.ms?)")
                log.warning("producer for %s was fenced by a newer owner; dropping this batch", tp)
                return False
            except KafkaError as exc:
                # The transaction was aborted. A dead letter that its topic refused as too large
                # goes again at once, without the photo's bytes (see consumer.sink).
                failures = {i: f.exception() for i, f in enumerate(futures)
                            if f.done() and not f.cancelled() and f.exception()}
                if len(futures) < len(records):
                    failures.setdefault(len(futures), exc)  # send() itself raised for this record
                errors = [exc, *failures.values()]
                shrunk = shrink_refused(records, failures)
                if shrunk or any(isinstance(e, RENEW_PRODUCER_ERRORS) for e in errors):
                    # A renewed producer fences whoever else holds this id: only for our own partition.
                    if self._lost is not None:
                        raise OwnershipLost(self._lost) from exc
                    if self._moving(tp):
                        log.warning("%s is moving to another member; its new owner re-reads these photos", tp)
                        return False
                    await self._renew_producer(tp)
                if shrunk:
                    continue
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                if (hint := missing_acl(exc, writing=True)) is not None:
                    log.error(hint)
                degraded(self._health, self._metrics,
                         f"transaction for {tp} failed ({type(exc).__name__}: {exc}); retrying in {delay:.1f}s")
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self._health.set(publishing=True)
            return True
