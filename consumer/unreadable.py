"""Record batches that the consumer cannot read, and what the service does about them.

A batch can be unreadable to this process while the broker serves it happily: compressed with a
codec whose library is missing here, or failing its CRC check. aiokafka then raises from
``getmany`` at the batch's first offset on every poll; Kafka's own Java consumer does the same
and asks the application to seek past it. Without handling, the service would exit and fail
again at the same offset after every restart: a crash loop.

What happens instead (``SHELFMATCH_ON_UNREADABLE_BATCH``):

Either way the fetch stage first waits until every photo fetched so far is committed, then finds
the partition and offset range that cannot be read, with a consumer of its own that reads the
assigned partitions record by record from their committed offsets. The readable records before
the range (the failed poll had taken them, and lost them with its error) go down the pipeline;
every other partition goes back to its committed offset (a failed poll can also have taken
records of other partitions, which would otherwise be skipped). Then:

- ``dead-letter`` (default): one dead letter with reason ``unreadable-batch`` names the source
  topic, partition and first and last offset of the range (``dlq-source-offset`` and
  ``dlq-source-offset-last``), and the partition goes on after the range. The range's data stays
  in the input topic, where a reader with the codec can still read it.
- ``stop``: once the records before the range are committed, the service exits 1 with one line
  that names the range.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CorruptRecordException, UnsupportedCodecError

from consumer.errors import ServiceError
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

# Errors aiokafka raises from getmany for a batch it cannot decode.
UNREADABLE_ERRORS = (UnsupportedCodecError, CorruptRecordException)
REASON = "unreadable-batch"
PROBE_TIMEOUT_MS = 2_000  # one fetch of the probing consumer


class UnreadableBatchError(ServiceError):
    """A batch cannot be read and the service is set to stop on it (or could not skip it)."""


@dataclass(frozen=True)
class UnreadableRange:
    """Offsets ``first`` to ``last`` (inclusive) of ``tp`` cannot be read; ``error`` says why."""

    tp: TopicPartition
    first: int
    last: int
    error: str
    before: tuple[ConsumerRecord, ...] = ()  # readable records of ``tp`` from its committed offset to ``first``

    def describe(self) -> str:
        return f"{self.tp.topic} partition {self.tp.partition} offsets {self.first}-{self.last} ({self.error})"

    def record(self) -> ConsumerRecord:
        """A stand-in for the range's last record, so that the dead letter commits past it."""
        return ConsumerRecord(
            topic=self.tp.topic, partition=self.tp.partition, offset=self.last, timestamp=int(time.time() * 1000),
            timestamp_type=0, key=None, value=None, checksum=None, serialized_key_size=-1,
            serialized_value_size=-1, headers=[],
        )


class UnreadableBatches:
    """Finds and steps over unreadable batches for the fetch stage (see the module docstring).

    ``probe_config`` is the keyword arguments of a consumer like the service's (its group is
    dropped: the probing consumer only reads, from offsets it is given).
    """

    def __init__(
        self, policy: Literal["dead-letter", "stop"], probe_config: dict[str, Any], metrics: Metrics,
    ) -> None:
        self.policy = policy
        self._probe_config = {**probe_config, "group_id": None, "enable_auto_commit": False}
        self._metrics = metrics

    async def step_over(
        self, consumer: AIOKafkaConsumer, error: BaseException, *, handed: dict[TopicPartition, int],
        max_records: int, budget_s: float,
    ) -> UnreadableRange | None:
        """After ``getmany`` raised ``error``, and once every photo fetched before is committed,
        locate the unreadable range, put every partition back where the pipeline left it and the
        range's partition after it. ``handed`` is, per partition, the offset after the last record
        the fetch stage passed on: the broker's committed offset can lag a transaction that just
        committed, so it only counts where it is further (another member moved the partition on)
        or where this member fetched nothing yet. Returns the range, or None when it could not be
        reproduced or a rebalance came in between (the next poll tries again)."""
        assignment = consumer.assignment()
        positions = {}
        for tp in assignment:
            committed = await self._committed(consumer, tp)
            positions[tp] = max(committed, handed.get(tp, committed))
        found = await self._locate(positions, max_records, error, budget_s)
        if consumer.assignment() != assignment:
            log.warning("a rebalance came while locating an unreadable batch; polling again from the new assignment")
            return None
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        if found is None:
            log.warning("a poll failed with %r but no partition reproduces it; polling again", error)
            return None
        self._metrics.unreadable_batches.labels(found.tp.topic).inc()
        if self.policy == "dead-letter":
            log.error("cannot read %s; it goes to the dead-letter topic and consumption resumes at offset %d",
                      found.describe(), found.last + 1)
        consumer.seek(found.tp, found.last + 1 if self.policy == "dead-letter" else found.first)
        return found

    def stop_error(self, found: UnreadableRange) -> UnreadableBatchError | None:
        """What to raise, once the records before the range are committed, with policy ``stop``."""
        if self.policy != "stop":
            return None
        return UnreadableBatchError(f"cannot read {found.describe()} (SHELFMATCH_ON_UNREADABLE_BATCH=stop); "
                                    "install the codec, or set it to dead-letter to step over the range")

    @staticmethod
    async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
        committed = await consumer.committed(tp)
        if committed is not None:
            return int(committed)
        return int((await consumer.beginning_offsets([tp]))[tp])  # auto_offset_reset=earliest

    async def _locate(
        self, positions: dict[TopicPartition, int], max_records: int, error: BaseException, budget_s: float,
    ) -> UnreadableRange | None:
        """Read each partition from its position, one record at a time, up to ``max_records``
        (the failed poll asked for no more): the first that raises holds the range's start; its
        end is the offset before the first one that reads again (a fetch at any offset of a
        batch returns the whole batch), or the end of the partition."""
        probe = AIOKafkaConsumer(**self._probe_config)
        await probe.start()
        try:
            probe.assign(list(positions))
            ends = await probe.end_offsets(list(positions))
            deadline = time.monotonic() + budget_s
            for tp, start in sorted(positions.items()):
                first, before = await self._first_unreadable(probe, tp, start, ends[tp], max_records, deadline)
                if first is None:
                    continue
                # A long unreadable stretch is stepped over in pieces (one dead letter each), so
                # that the member polls again in time and is never evicted from its group.
                last, why = await self._last_unreadable(probe, tp, first, min(ends[tp], first + max_records),
                                                        deadline)
                return UnreadableRange(tp=tp, first=first, last=last, error=why or _why(error),
                                       before=tuple(before))
            return None
        finally:
            await probe.stop()

    @staticmethod
    async def _first_unreadable(
        probe: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, max_records: int, deadline: float,
    ) -> tuple[int | None, list[ConsumerRecord]]:
        """The first offset of ``tp`` from ``start`` that cannot be read within ``max_records``
        records, and the records read before it. ``end`` is the last stable offset (the probe
        reads committed records only), so an empty fetch before it is a slow one: asked again."""
        probe.seek(tp, start)
        before: list[ConsumerRecord] = []
        while len(before) < max_records and time.monotonic() < deadline:
            position = await probe.position(tp)
            if position >= end:
                break
            try:
                got = await probe.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except UNREADABLE_ERRORS:
                return position, before
            before.extend(got.get(tp, []))
        return None, []

    @staticmethod
    async def _last_unreadable(
        probe: AIOKafkaConsumer, tp: TopicPartition, first: int, end: int, deadline: float,
    ) -> tuple[int, str]:
        """The last offset before ``end`` of the unreadable stretch from ``first``, and why; the
        stretch is cut short at ``end`` or at ``deadline`` (the next poll finds the rest)."""
        why = ""
        offset = first + 1
        while offset < end and time.monotonic() < deadline:
            probe.seek(tp, offset)
            try:
                got = await probe.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except UNREADABLE_ERRORS as exc:
                why = _why(exc)
                offset += 1
                continue
            records = got.get(tp, [])
            return (records[0].offset - 1 if records else offset - 1), why
        return offset - 1, why  # every offset before ``offset`` was found unreadable


def _why(exc: BaseException) -> str:
    text = str(exc)  # aiokafka's errors already start with their class name
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
