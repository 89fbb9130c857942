"""At-least-once delivery: publish a batch's events and dead letters, then commit its offsets.

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
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumer.delivery import Outcome, Retry, record_delivered
from consumer.health import Health
from consumer.metrics import Metrics

log = logging.getLogger(__name__)


class AtLeastOnceSink:
    """One idempotent producer for everything, then a plain offset commit (a :class:`Sink`)."""

    def __init__(
        self, producer_kwargs: dict[str, Any], consumer: AIOKafkaConsumer, metrics: Metrics, health: Health,
        timeout_s: float = 30.0,
    ) -> None:
        self._producer_kwargs = producer_kwargs
        self._producer = AIOKafkaProducer(**producer_kwargs)
        self._consumer = consumer
        self._metrics = metrics
        self._health = health
        self._timeout_s = timeout_s
        self._acks: dict[Outcome, dict[int, asyncio.Future]] = {}  # per batch sent: record index -> ack

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def _renew_producer(self) -> bool:
        """A producer whose idempotence state broke (sequence numbers lost in an outage, or
        spent on a record the broker refused; aiokafka does not reset them) is replaced: a new
        producer id starts clean; duplicates keep their event_id."""
        await self._producer.stop()
        self._producer = AIOKafkaProducer(**self._producer_kwargs)
        await self._producer.start()
        return True

    async def send(self, outcome: Outcome) -> None:
        """Hand every record to the producer; :meth:`settle` awaits the acknowledgements."""
        self._acks[outcome] = {}
        await self._send(outcome, range(len(outcome.records)))

    async def _send(self, outcome: Outcome, indices: Iterable[int]) -> None:
        """Send the records at ``indices``; each gets its acknowledgement future. After a send()
        that raises, the rest are not tried and share its failed future."""
        acks = self._acks[outcome]
        failed: asyncio.Future | None = None
        for i in indices:
            if failed is None:
                r = outcome.records[i]
                try:
                    acks[i] = await self._producer.send(r.topic, r.value, key=r.key, headers=r.headers)
                    continue
                except KafkaError as exc:  # e.g. no metadata for a missing topic: settle() retries
                    failed = asyncio.get_running_loop().create_future()
                    failed.set_exception(exc)
            acks[i] = failed

    async def settle(self, outcome: Outcome) -> None:
        """Wait for every acknowledgement (re-sending what failed), then commit the offsets."""
        start = time.perf_counter()
        acks = self._acks[outcome]
        retry = Retry(self._health, self._metrics)
        while True:
            _, pending = await asyncio.wait(set(acks.values()), timeout=self._timeout_s)
            if pending:
                # The producer is still retrying (broker unreachable): keep waiting, but show it.
                retry.degraded(f"{len(pending)} of {len(acks)} acknowledgements outstanding "
                               f"after {self._timeout_s:.0f}s")
                continue
            failed = [i for i, f in sorted(acks.items()) if f.exception() is not None]
            if not failed:
                break
            errors: list[BaseException] = []
            for i in failed:
                err = acks[i].exception()
                assert err is not None
                if not isinstance(err, KafkaError):
                    raise err
                errors.append(err)
            tried: dict[int, BaseException] = {}  # records after a send() that raised share its future
            seen: set[asyncio.Future] = set()
            for i, err in zip(failed, errors, strict=True):
                if acks[i] not in seen:
                    seen.add(acks[i])
                    tried[i] = err
            await retry.after_failure(outcome.records, tried, errors, renew=self._renew_producer,
                                      what=f"publishing {len(failed)} of {len(outcome.records)} records to "
                                      f"{', '.join(sorted({outcome.records[i].topic for i in failed}))} failed")
            await self._send(outcome, failed)
        del self._acks[outcome]
        acked = time.time()
        retry.succeeded()
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
