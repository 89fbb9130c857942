"""Publish a batch's events and dead letters, then commit its offsets.

The order is the at-least-once guarantee and must not change:

1. send every output record of the batch (events and dead letters) to the producer;
2. wait until the broker has acknowledged *all* of them (``acks=all``, idempotent producer);
   if some failed, send those again after a back-off, for as long as it takes (offsets never
   move past an unpublished photo). A dead letter that its topic refuses as too large (a
   ``max.message.bytes`` below the input topic's) is sent again without the photo's bytes: its
   headers still name the source partition and offset, where the photo stays;
3. only then commit, per partition, the offset after the batch's last record.

Batches settle strictly in the order they were fetched, so a commit never skips a batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CommitFailedError, IllegalStateError, KafkaError, MessageSizeTooLargeError, OutOfOrderSequenceNumber,
    RecordTooLargeError, UnknownProducerId,
)

from consumer.acls import missing_acl
from consumer.metrics import Metrics
from consumer.source import END, InFlight

log = logging.getLogger(__name__)

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Errors after which an idempotent producer cannot go on (its sequence numbers are lost).
PRODUCER_STATE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId)
# A record refused for its size (by the broker, or by the producer's max_request_size).
TOO_LARGE_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError)
# After these a producer is replaced: a refused record also leaves its sequence numbers behind.
RENEW_PRODUCER_ERRORS = (*PRODUCER_STATE_ERRORS, *TOO_LARGE_ERRORS)
TRUNCATED_FROM = "dlq-value-truncated-from"


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
    futures: list[asyncio.Future] = field(default_factory=list, repr=False)  # one per record


def without_value(record: OutRecord) -> OutRecord | None:
    """The dead letter again with an empty value, for a topic that refused it as too large; the
    ``dlq-value-truncated-from`` header keeps the original size. None for anything else."""
    if record.dead_letter is None or not record.value:
        return None
    original = dict(record.headers).get(TRUNCATED_FROM, str(len(record.value)).encode())
    headers = [(k, v) for k, v in record.headers if k != TRUNCATED_FROM] + [(TRUNCATED_FROM, original)]
    return replace(record, value=b"", headers=headers)


def shrink_refused(records: list[OutRecord], failures: dict[int, BaseException]) -> int:
    """Replace each dead letter in ``records`` whose failure (by index) is a refusal for size by
    its value-less copy. Returns how many were replaced."""
    shrunk = 0
    for i, err in failures.items():
        smaller = without_value(records[i]) if isinstance(err, TOO_LARGE_ERRORS) else None
        if smaller is not None:
            log.warning("%s refused a %d-byte dead letter (%s); sending it without the photo's bytes",
                        smaller.topic, len(records[i].value), type(err).__name__)
            records[i] = smaller
            shrunk += 1
    return shrunk


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
    """What /readyz reports: set by the stages, read by the HTTP thread; mirrored in the
    ``shelfmatch_ready`` gauge when one is given."""

    def __init__(self, ready_gauge=None) -> None:
        self.consuming = False
        self.publishing = True
        self.last_tick = time.monotonic()
        self._gauge = ready_gauge

    @property
    def ready(self) -> bool:
        return self.consuming and self.publishing

    def set(self, *, consuming: bool | None = None, publishing: bool | None = None) -> None:
        if consuming is not None:
            self.consuming = consuming
        if publishing is not None:
            self.publishing = publishing
        if self._gauge is not None:
            self._gauge.set(1 if self.ready else 0)


def degraded(health: Health, metrics: Metrics, why: str) -> None:
    """A publish attempt failed or is stuck: offsets stay where they are, readiness drops
    until a batch is acknowledged again."""
    log.warning("%s; offsets held", why)
    health.set(publishing=False)
    metrics.publish_retries.inc()


class Sink:
    """At-least-once: one idempotent producer for everything, then a plain offset commit."""

    def __init__(
        self, producer_kwargs: dict, consumer: AIOKafkaConsumer, metrics: Metrics, health: Health,
        timeout_s: float = 30.0,
    ) -> None:
        self._producer_kwargs = producer_kwargs
        self._producer = AIOKafkaProducer(**producer_kwargs)
        self._consumer = consumer
        self._metrics = metrics
        self._health = health
        self._timeout_s = timeout_s

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """Nothing per partition in this mode (see TransactionalSink)."""

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Nothing per partition in this mode (see TransactionalSink)."""

    def revoking(self, partitions: set[TopicPartition]) -> None:
        """Nothing per partition in this mode (see TransactionalSink)."""

    async def drain_timed_out(self, partitions: set[TopicPartition]) -> None:
        """Nothing to do in this mode: the new owner re-reads what was not committed (duplicates
        with the same ``event_id``, never a loss)."""

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def _renew_producer(self) -> None:
        """A producer whose idempotence state broke (sequence numbers lost in an outage, or
        spent on a record the broker refused; aiokafka does not reset them) is replaced: a new
        producer id starts clean; duplicates keep their event_id."""
        await self._producer.stop()
        self._producer = AIOKafkaProducer(**self._producer_kwargs)
        await self._producer.start()

    async def send(self, outcome: Outcome, only: list[int] | None = None) -> None:
        """Hand the records (all, or those at ``only``) to the producer; delivery is awaited
        later, in :meth:`settle`. ``outcome.futures[i]`` is record i's acknowledgement."""
        indices = range(len(outcome.records)) if only is None else only
        if only is None:
            outcome.futures = [None] * len(outcome.records)
        failed = None
        for i in indices:
            if failed is None:
                r = outcome.records[i]
                try:
                    outcome.futures[i] = await self._producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                    continue
                except KafkaError as exc:  # e.g. no metadata for a missing topic: settle() retries
                    failed = asyncio.get_running_loop().create_future()
                    failed.set_exception(exc)
            outcome.futures[i] = failed  # not tried: the next attempt sends it

    async def settle(self, outcome: Outcome) -> None:
        """Wait for every acknowledgement (re-sending what failed), then commit the offsets."""
        start = time.perf_counter()
        attempt = 0
        while True:
            done, pending = await asyncio.wait(set(outcome.futures), timeout=self._timeout_s)
            if pending:
                # The producer is still retrying (broker unreachable): keep waiting, but show it.
                degraded(self._health, self._metrics, f"{len(pending)} of {len(outcome.futures)} acknowledgements outstanding "
                               f"after {self._timeout_s:.0f}s")
                continue
            failed = [i for i, f in enumerate(outcome.futures) if f.exception() is not None]
            if not failed:
                break
            errors = [outcome.futures[i].exception() for i in failed]
            for err in errors:
                if not isinstance(err, KafkaError):
                    raise err
            tried, seen = {}, set()  # records after a send() that raised share its failed future: not tried
            for i in failed:
                if outcome.futures[i] not in seen:
                    seen.add(outcome.futures[i])
                    tried[i] = outcome.futures[i].exception()
            if shrink_refused(outcome.records, tried) < len(failed):
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                if (hint := missing_acl(errors[0], writing=True, topic=outcome.records[failed[0]].topic)) is not None:
                    log.error(hint)
                degraded(self._health, self._metrics, f"publishing {len(failed)} of {len(outcome.records)} records failed "
                               f"({type(errors[0]).__name__}: {errors[0]}); retrying in {delay:.1f}s")
                attempt += 1
                await asyncio.sleep(delay)
            if any(isinstance(e, RENEW_PRODUCER_ERRORS) for e in errors):
                await self._renew_producer()
            await self.send(outcome, only=failed)
        acked = time.time()
        if attempt or not self._health.publishing:
            log.info("publishing recovered")
        self._health.set(publishing=True)
        self._metrics.stage.labels("publish").observe(time.perf_counter() - start)
        record_delivered(self._metrics, outcome.records, acked)
        await self.commit(outcome.offsets)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        start = time.perf_counter()
        try:
            # aiokafka waits for the group coordinator without end; bound it so that an outage
            # shows (readiness drops) and later batches keep their place in line.
            await asyncio.wait_for(self._consumer.commit(offsets), self._timeout_s)
        except TimeoutError:
            self._metrics.commit_failures.inc()
            self._health.set(publishing=False)
            log.warning("commit of %s timed out after %.0fs; the next commit covers it", offsets, self._timeout_s)
            return
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
