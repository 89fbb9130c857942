"""Delivery: what a processed batch hands to Kafka, the interface both delivery modes implement,
and the last two stages of the pipeline.

A batch's :class:`Outcome` goes through two stages, in fetch order:

- :func:`publish` calls ``sink.send(outcome)``: hand the records to the producer without waiting
  (at-least-once sends at once; exactly-once sends inside the batch's transaction later);
- :func:`commit_in_order` calls ``sink.settle(outcome)``: wait until the broker has acknowledged
  every record, retrying what failed, then commit the batch's offsets. Offsets never move past an
  unacknowledged photo, and a commit never skips a batch.

The two implementations are :class:`consumer.sink.AtLeastOnceSink` (one idempotent producer, then
a plain offset commit) and :class:`consumer.transactions.TransactionalSink` (one transaction per
input partition, offsets inside it). The transactional sink also follows partition ownership
(:class:`PartitionOwner`), which the rebalance listener drives. Both retry through one
:class:`Retry`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    UnknownProducerId,
)

from consumer.acls import missing_acl
from consumer.health import Health
from consumer.metrics import Metrics
from consumer.source import InFlight
from consumer.stream import END, EndOfStream

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
    """One record to publish: a match event or a dead letter."""

    source: TopicPartition  # the input partition the photo came from
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    source_timestamp_ms: int
    verdict: str | None = None  # set on events: a MatchEvent's verdict, or "compliance"
    facings: tuple[tuple[str, int], ...] = ()  # a ComplianceEvent's facings per status
    dead_letter: str | None = None  # the reason, set on dead letters


@dataclass(eq=False)  # compared and hashed by identity: a sink may key its pending work by outcome
class Outcome:
    """Everything one batch produced, and the offsets it may commit once published (what the
    process stage puts on its queue)."""

    records: list[OutRecord]
    offsets: dict[TopicPartition, int]
    photos: int


class Sink(Protocol):
    """A delivery mode. ``send`` and ``settle`` are called once per batch, each in fetch order,
    ``send`` possibly several batches ahead of ``settle``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, outcome: Outcome) -> None:
        """Begin delivering the batch's records, without waiting for acknowledgements."""

    async def settle(self, outcome: Outcome) -> None:
        """Return once every record is acknowledged and the offsets are committed (or the batch
        is dropped because its partition moved to another member)."""


class PartitionOwner(Protocol):
    """A sink whose state follows partition ownership (the transactional one); the rebalance
    listener calls these in this order: ``revoking``, then ``revoked`` or ``drain_timed_out``,
    then ``assigned``."""

    def revoking(self, partitions: set[TopicPartition]) -> None: ...

    async def revoked(self, partitions: set[TopicPartition]) -> None: ...

    async def drain_timed_out(self, partitions: set[TopicPartition]) -> None: ...

    async def assigned(self, partitions: set[TopicPartition]) -> None: ...


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


def record_delivered(metrics: Metrics, records: Iterable[OutRecord], acked_at: float) -> None:
    """Count what the broker acknowledged: end-to-end latency, outcomes, verdicts, DLQ reasons."""
    for r in records:
        metrics.end_to_end.observe(max(0.0, acked_at - r.source_timestamp_ms / 1000))
        if r.dead_letter is not None:
            metrics.photos.labels("dead_lettered").inc()
            metrics.dead_letters.labels(r.dead_letter).inc()
        else:
            metrics.photos.labels("matched").inc()
            metrics.verdicts.labels(r.verdict).inc()
            for status, n in r.facings:
                metrics.facings.labels(status).inc(n)


class Retry:
    """Attempts at delivering one batch: what a failed attempt calls for, shared by both sinks.

    After a failure, dead letters refused as too large are replaced by their value-less copies
    (the retry differs, so it goes at once); anything else waits a back-off first; then a producer
    whose idempotence state broke is renewed (waiting for the brokers if they are still away).
    Each failure drops readiness and counts a publish retry, until :meth:`succeeded`.
    """

    def __init__(self, health: Health, metrics: Metrics) -> None:
        self._health = health
        self._metrics = metrics
        self.attempts = 0

    def degraded(self, why: str) -> None:
        """A publish attempt failed or is stuck: offsets stay where they are, and readiness
        drops until a batch is acknowledged again."""
        log.warning("%s; offsets held", why)
        self._health.set(publishing=False)
        self._metrics.publish_retries.inc()

    async def after_failure(
        self, records: list[OutRecord], failures: dict[int, BaseException], errors: Iterable[BaseException], *,
        what: str, renew: Callable[[], Awaitable[bool]],
    ) -> bool:
        """Prepare the next attempt. ``failures`` maps indices of ``records`` to their error,
        ``errors`` is every error seen in the attempt, ``what`` says what failed, for the log.
        ``renew`` replaces the producer, or returns False when the batch is no longer this
        member's to deliver; then so does this."""
        errors = list(errors)
        shrunk = shrink_refused(records, failures)
        if not shrunk:
            first = errors[0] if errors else None
            topic = records[min(failures)].topic if failures else None
            if first is not None and (hint := missing_acl(first, writing=True, topic=topic)) is not None:
                log.error(hint)
            await self.back_off(f"{what} ({type(first).__name__}: {first})")
        if any(isinstance(e, RENEW_PRODUCER_ERRORS) for e in errors):
            while True:  # a new producer needs the brokers: after an outage, wait for them
                try:
                    return await renew()
                except KafkaError as exc:
                    await self.back_off(f"replacing the producer failed ({type(exc).__name__}: {exc})")
        return True

    async def back_off(self, why: str) -> None:
        delay = BACKOFF_S[min(self.attempts, len(BACKOFF_S) - 1)]
        self.degraded(f"{why}; retrying in {delay:.1f}s")
        self.attempts += 1
        await asyncio.sleep(delay)

    def succeeded(self) -> None:
        if self.attempts or self._health.publishing is False:  # None: the first batch, nothing to recover
            log.info("publishing recovered")
        self._health.set(publishing=True)


async def publish(inq: asyncio.Queue[Outcome | EndOfStream], outq: asyncio.Queue[Outcome | EndOfStream],
                  sink: Sink) -> None:
    """Stage 5: hand each batch's records to the sink without waiting for acknowledgements."""
    while not isinstance(outcome := await inq.get(), EndOfStream):
        await sink.send(outcome)
        await outq.put(outcome)
    await outq.put(END)


async def commit_in_order(inq: asyncio.Queue[Outcome | EndOfStream], sink: Sink, in_flight: InFlight) -> None:
    """Stage 6: in fetch order, wait for each batch's acknowledgements and commit its offsets."""
    while not isinstance(outcome := await inq.get(), EndOfStream):
        await sink.settle(outcome)
        in_flight.done(outcome.photos)
