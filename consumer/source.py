"""Kafka fetch and decode: records in, decoded photos (or dead-letter verdicts) out.

Every record is handed to the decode pool the moment it is fetched, so decoding overlaps the
model's work on the previous batch. Records enter the bounded queue in fetch order, which keeps
offsets in order per partition and bounds the memory held by a backlog.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from catalog.errors import ImageRejected
from catalog.preprocess import (
    DecodeLimits,
    PlainJpeg,
    RejectReason,
    decode,
    decode_frame,
    decode_unless_plain_jpeg,
)
from consumer.facings import Frames, Regions, check_regions, regions_for
from consumer.messages import parse_headers
from consumer.metrics import Metrics
from consumer.stream import END, EndOfStream
from consumer.unreadable import REASON, UNREADABLE_ERRORS, UnreadableBatches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedPhoto:
    """A decoded photo: model input plus what the producer said about it."""

    pixels: torch.Tensor  # uint8 (3, H, W) at the model's input size; with regions, the frame (aspect kept)
    fields: dict[str, Any]  # key, camera_id, store_id, shelf_id, captured_at, content_type
    width: int
    height: int
    decode_s: float
    regions: Regions | None = None  # the facings to cut from it; None: matched whole


@dataclass(frozen=True)
class PendingJpeg:
    """A plain JPEG whose headers passed the checks, left for the batched device decoder
    (:meth:`consumer.pipeline.Recognizer.decode_jpegs` turns it into a :class:`DecodedPhoto`)."""

    jpeg: PlainJpeg
    fields: dict[str, Any]
    width: int
    height: int
    decode_s: float


@dataclass(frozen=True)
class Poison:
    """A record that cannot be matched; it goes to the dead-letter topic."""

    reason: str
    error: str
    first_offset: int | None = None  # set when it stands for a range of records, up to its record's offset

    @classmethod
    def of(cls, exc: Exception) -> Poison:
        """The dead letter for a failed decode. A failure that is not a known rejection (a library
        bug, say) is logged and dead-lettered as corrupt-image, rather than crashing the service
        again after every restart; a MemoryError is raised again (the photo may be fine)."""
        if isinstance(exc, ImageRejected):
            return cls(reason=exc.reason, error=str(exc))
        if isinstance(exc, MemoryError):
            raise exc
        log.error("unexpected error decoding a photo", exc_info=exc)
        return cls(reason=RejectReason.CORRUPT_IMAGE.value, error=f"unexpected {type(exc).__name__}: {exc}")


# What decoding one record gives.
Decoded = DecodedPhoto | PendingJpeg | Poison


@dataclass
class Received:
    """A fetched record and its decode, started at once in the decode pool (what the fetch
    stage puts on its queue)."""

    record: ConsumerRecord
    arrived: float  # time.monotonic() when fetched
    decoded: asyncio.Future[Decoded] = field(repr=False)

    def drop_value(self) -> None:
        """Forget the photo's bytes once it is decoded: only a dead letter needs them again, and a
        batch's bytes would otherwise stay in memory until it is published (up to 5 MB a photo)."""
        self.record = replace(self.record, value=None)


def decode_record(
    record: ConsumerRecord, size: tuple[int, int], limits: DecodeLimits, device_jpeg: bool = False,
    frames: Frames | None = None,
) -> Decoded:
    """Decode one record (runs in the decode pool). Never raises for bad input.

    With ``device_jpeg`` a plain JPEG only has its headers checked here; its pixels are decoded
    later with the rest of its batch on the model's device (see :mod:`catalog.jpeg_batch`).
    With ``frames``, a photo that has regions (:func:`consumer.facings.regions_for`) is decoded
    whole at up to ``frames.max_side`` pixels (:func:`catalog.preprocess.decode_frame`), for its
    facings to be cut on the device.
    """
    start = time.perf_counter()
    try:
        fields = parse_headers(record.key, record.headers)
        data = record.value or b""
        regions = regions_for(fields, record.headers, frames.planograms()) if frames is not None else None
        if regions is not None:
            assert frames is not None
            frame = decode_frame(data, frames.max_side, limits)
            check_regions(regions, frame.width, frame.height)
            return DecodedPhoto(pixels=frame.pixels, fields=fields, width=frame.width, height=frame.height,
                                decode_s=time.perf_counter() - start, regions=regions)
        decoded = decode_unless_plain_jpeg(data, size, limits) if device_jpeg else decode(data, size, limits)
    except Exception as exc:
        return Poison.of(exc)
    if isinstance(decoded, PlainJpeg):
        return PendingJpeg(jpeg=decoded, fields=fields, width=decoded.width, height=decoded.height,
                           decode_s=time.perf_counter() - start)
    return DecodedPhoto(
        pixels=decoded.pixels, fields=fields, width=decoded.width, height=decoded.height,
        decode_s=time.perf_counter() - start,
    )


class InFlight:
    """Counts photos fetched but not yet committed, so a rebalance can wait for zero."""

    def __init__(self, metrics: Metrics) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics = metrics

    def add(self, n: int) -> None:
        self._count += n
        self._idle.clear()
        self._metrics.in_flight.set(self._count)

    def done(self, n: int) -> None:
        self._count -= n
        self._metrics.in_flight.set(self._count)
        if self._count == 0:
            self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False


class FetchQueue(asyncio.Queue[Received | EndOfStream]):
    """The queue of fetched records, whose one writer can wait for room without holding a record."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self._taken = asyncio.Event()

    async def get(self) -> Received | EndOfStream:
        item = await super().get()
        self._taken.set()
        return item

    def get_nowait(self) -> Received | EndOfStream:
        item = super().get_nowait()
        self._taken.set()
        return item

    async def wait_for_room(self, timeout_s: float) -> bool:
        """True as soon as an item can be put; False if the queue stayed full for ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.full():
                    self._taken.clear()
                    await self._taken.wait()
        except TimeoutError:
            return not self.full()
        return True


async def fetch(
    consumer: AIOKafkaConsumer,
    out: FetchQueue,
    *,
    pool: Executor,
    size: tuple[int, int],
    limits: DecodeLimits,
    stop: asyncio.Event,
    in_flight: InFlight,
    metrics: Metrics,
    max_records: int,
    poll_every_s: float,
    device_jpeg: bool = False,
    unreadable: UnreadableBatches | None = None,
    frames: Frames | None = None,
) -> None:
    """Stage 1: poll Kafka until ``stop`` is set; start decoding each record at once.

    Backpressure is waiting for room in ``out`` before fetching, never holding a record outside
    it: a slow model leaves the backlog in Kafka, and aiokafka keeps at most one fetched response
    per partition meanwhile. Partitions are not paused for that: pausing makes aiokafka drop the
    responses it holds (to fetch them again after resume), and a dropped response stays in memory
    until the cyclic garbage collector runs, which with full-HD frames was hundreds of MB. Only
    when the queue stays full for ``poll_every_s`` (a third of ``max_poll_interval_ms``) is the
    consumer polled with every partition paused, so the group never evicts a member whose model
    is slow.
    """
    loop = asyncio.get_running_loop()
    handed: dict[TopicPartition, int] = {}  # per partition, the offset after the last record passed on

    def hand_on(record: ConsumerRecord, decoded: Decoded | None = None) -> None:
        """Put a record on ``out`` with its decode started (or already known)."""
        if decoded is None:
            future = loop.run_in_executor(pool, decode_record, record, size, limits, device_jpeg, frames)
        else:
            future = _done(decoded)
        in_flight.add(1)
        handed[TopicPartition(record.topic, record.partition)] = record.offset + 1
        out.put_nowait(Received(record=record, arrived=time.monotonic(), decoded=future))

    while not stop.is_set():
        if not await out.wait_for_room(poll_every_s):
            await _poll_paused(consumer)
            continue
        if consumer.paused():
            consumer.resume(*consumer.paused())
        free = out.maxsize - out.qsize()  # only grows while we wait: this task is the only writer
        try:
            fetched = await consumer.getmany(timeout_ms=100, max_records=min(max_records, free))
        except UNREADABLE_ERRORS as exc:
            if unreadable is None:
                raise
            # Everything fetched before goes through first; meanwhile the member stays in its group
            # with every partition paused (a paused poll returns nothing, so it cannot raise this).
            while not await in_flight.wait_idle(poll_every_s):
                await _poll_paused(consumer)
            found = await unreadable.step_over(consumer, exc, handed=handed, max_records=min(max_records, free),
                                               budget_s=poll_every_s / 2)
            if found is None:
                continue
            for record in found.before:  # fewer than the poll asked for: there is room
                hand_on(record)
            if (error := unreadable.stop_error(found)) is not None:
                while not await in_flight.wait_idle(poll_every_s):
                    await _poll_paused(consumer)
                raise error from exc
            hand_on(found.record(), Poison(reason=REASON, error=found.error, first_offset=found.first))
            continue
        for tp, records in fetched.items():
            for record in records:
                hand_on(record)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - (records[-1].offset + 1))
                metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
    await out.put(END)


def _done(result: Decoded) -> asyncio.Future[Decoded]:
    future: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


async def _poll_paused(consumer: AIOKafkaConsumer) -> None:
    """Poll with every assigned partition paused: it returns nothing and keeps the member in its
    group. Should a rebalance end during the poll, records of newly assigned (unpaused)
    partitions may come back; they are given back by seeking to the first of them."""
    consumer.pause(*consumer.assignment())
    for tp, records in (await consumer.getmany(timeout_ms=0)).items():
        consumer.seek(tp, records[0].offset)
