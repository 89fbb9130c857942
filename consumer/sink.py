"""Publish a batch's events and dead letters, then commit its offsets.

The order is the at-least-once guarantee and must not change:

1. send every output record of the batch (events and dead letters) to the producer;
2. wait until the broker has acknowledged *all* of them (``acks=all``, idempotent producer);
   if any failed, send the whole batch again after a back-off, for as long as it takes
   (duplicates carry the same ``event_id``; offsets never move past an unpublished photo);
3. only then commit, per partition, the offset after the batch's last record.

Batches settle strictly in the order they were fetched, so a commit never skips a batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumer.metrics import Metrics
from consumer.source import END, InFlight

log = logging.getLogger(__name__)

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class OutRecord:
    source: TopicPartition  # the input partition the photo came from
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    source_timestamp_ms: int
    verdict: str | None = None  # set on match events
    dead_letter: str | None = None  # the reason, set on dead letters


@dataclass
class Outcome:
    """Everything one batch produced, and the offsets it may commit once published."""

    records: list[OutRecord]
    offsets: dict[TopicPartition, int]
    photos: int
    futures: list[asyncio.Future] = field(default_factory=list, repr=False)


def record_delivered(metrics: Metrics, records: list[OutRecord], acked_at: float) -> None:
    """Count what the broker acknowledged: end-to-end latency, outcomes, verdicts, DLQ reasons."""
    for r in records:
        metrics.end_to_end.observe(max(0.0, acked_at - r.source_timestamp_ms / 1000))
        if r.dead_letter is not None:
            metrics.photos.labels("dead_lettered").inc()
            metrics.dead_letters.labels(r.dead_letter).inc()
        else:
            metrics.photos.labels("matched").inc()
            metrics.verdicts.labels(r.verdict).inc()


class Health:
    """What /readyz reports: set by the stages, read by the HTTP thread."""

    def __init__(self) -> None:
        self.consuming = False
        self.publishing = True
        self.last_tick = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.consuming and self.publishing


class Sink:
    """At-least-once: one idempotent producer for everything, then a plain offset commit."""

    def __init__(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, metrics: Metrics, health: Health) -> None:
        self._producer = producer
        self._consumer = consumer
        self._metrics = metrics
        self._health = health

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """Nothing per partition in this mode (see TransactionalSink)."""

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Nothing per partition in this mode (see TransactionalSink)."""

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, outcome: Outcome) -> None:
        """Hand every record to the producer; delivery is awaited later, in :meth:`settle`."""
        outcome.futures = []
        try:
            for r in outcome.records:
                outcome.futures.append(
                    await self._producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                )
        except KafkaError as exc:  # e.g. no metadata for a missing topic: settle() retries
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            outcome.futures.append(failed)

    async def settle(self, outcome: Outcome) -> None:
        """Wait for every acknowledgement (re-sending on failure), then commit the offsets."""
        start = time.perf_counter()
        attempt = 0
        while True:
            results = await asyncio.gather(*outcome.futures, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if not errors:
                break
            for err in errors:
                if not isinstance(err, KafkaError):
                    raise err
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            log.warning(
                "publishing %d records failed (%s: %s); retrying in %.1fs, offsets held",
                len(outcome.records), type(errors[0]).__name__, errors[0], delay,
            )
            self._health.publishing = False
            self._metrics.ready.set(0)
            self._metrics.publish_retries.inc()
            attempt += 1
            await asyncio.sleep(delay)
            await self.send(outcome)
        acked = time.time()
        if attempt:
            log.info("publishing recovered after %d retries", attempt)
        self._health.publishing = True
        self._metrics.ready.set(1 if self._health.ready else 0)
        self._metrics.stage.labels("publish").observe(time.perf_counter() - start)
        record_delivered(self._metrics, outcome.records, acked)
        await self.commit(outcome.offsets)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        start = time.perf_counter()
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another member in a rebalance; it re-reads from the last
            # committed offset, so these photos are published again there (same event ids).
            self._metrics.commit_failures.inc()
            log.warning("commit of %s refused (%s); the new owner will re-process", offsets, exc)
            return
        except KafkaError as exc:
            # Coordinator unreachable (broker restart, network): the next batch's commit covers
            # these offsets too; until then a restart would only repeat photos, never lose them.
            self._metrics.commit_failures.inc()
            log.warning("commit of %s failed (%s: %s); the next commit covers it", offsets, type(exc).__name__, exc)
            return
        self._metrics.stage.labels("commit").observe(time.perf_counter() - start)


async def publish(inq: asyncio.Queue, outq: asyncio.Queue, sink: Sink) -> None:
    """Stage 4: send each batch's records without waiting for their acknowledgements."""
    while (outcome := await inq.get()) is not END:
        await sink.send(outcome)
        await outq.put(outcome)
    await outq.put(END)


async def settle(inq: asyncio.Queue, sink: Sink, in_flight: InFlight) -> None:
    """Stage 5: in fetch order, await acknowledgements and commit."""
    while (outcome := await inq.get()) is not END:
        await sink.settle(outcome)
        in_flight.done(outcome.photos)
