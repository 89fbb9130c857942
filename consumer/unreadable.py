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

from consumer.metrics import Metrics

log = logging.getLogger(__name__)

# Errors aiokafka raises from getmany for a batch it cannot decode.
UNREADABLE_ERRORS = (UnsupportedCodecError, CorruptRecordException)
REASON = "unreadable-batch"
PROBE_TIMEOUT_MS = 2_000  # one fetch of the probing consumer


class UnreadableBatchError(RuntimeError):
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
        self, consumer: AIOKafkaConsumer, error: BaseException, *, drained: bool, max_records: int,
    ) -> UnreadableRange | None:
        """After ``getmany`` raised ``error``, and once every photo fetched before is committed
        (``drained``), locate the unreadable range, put every partition back at its committed
        offset and the range's partition after it. Returns the range, or None when it could not
        be reproduced (the next poll tries again). Raises :class:`UnreadableBatchError` when
        the photos fetched before could not be committed."""
        if not drained:
            raise UnreadableBatchError(f"a batch cannot be read ({error!r}) and the photos fetched before it "
                                       "could not be committed; stopping so that a restart resumes from there")
        assignment = consumer.assignment()
        positions = {tp: await self._committed(consumer, tp) for tp in assignment}
        found = await self._locate(positions, max_records, error)
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
        self, positions: dict[TopicPartition, int], max_records: int, error: BaseException,
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
            for tp, start in sorted(positions.items()):
                first, before = await self._first_unreadable(probe, tp, start, ends[tp], max_records)
                if first is None:
                    continue
                last, why = await self._last_unreadable(probe, tp, first, ends[tp])
                return UnreadableRange(tp=tp, first=first, last=last, error=why or _why(error),
                                       before=tuple(before))
            return None
        finally:
            await probe.stop()

    @staticmethod
    async def _first_unreadable(
        probe: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, max_records: int,
    ) -> tuple[int | None, list[ConsumerRecord]]:
        """The first offset of ``tp`` from ``start`` that cannot be read within ``max_records``
        records, and the records read before it."""
        probe.seek(tp, start)
        before: list[ConsumerRecord] = []
        while len(before) <= max_records:
            position = await probe.position(tp)
            if position >= end:
                break
            try:
                got = await probe.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except UNREADABLE_ERRORS:
                return position, before
            if not got:
                break  # nothing more to read now (e.g. an open transaction)
            before.extend(got[tp])
        return None, []

    @staticmethod
    async def _last_unreadable(probe: AIOKafkaConsumer, tp: TopicPartition, first: int, end: int) -> tuple[int, str]:
        why = ""
        offset = first + 1
        while offset < end:
            probe.seek(tp, offset)
            try:
                got = await probe.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except UNREADABLE_ERRORS as exc:
                why = _why(exc)
                offset += 1
                continue
            records = got.get(tp, [])
            return (records[0].offset - 1 if records else offset - 1), why
        return end - 1, why


def _why(exc: BaseException) -> str:
    text = str(exc)  # aiokafka's errors already start with their class name
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
