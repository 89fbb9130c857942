"""The stages wired together, and what each queue between them carries:

====================  =================================  ======================================
stage function        reads                              writes
====================  =================================  ======================================
1 ``fetch``           Kafka (``AIOKafkaConsumer``)       ``FetchQueue``: ``Received``
2 ``batches``         ``Received``                       ``list[Received]`` (size or timeout)
3 ``finish_decoding`` ``list[Received]``                 ``ReadyBatch`` (every photo decoded)
4 ``process``         ``ReadyBatch``                     ``Outcome`` (events, dead letters), once
                                                         every unit (photo or facing) is matched
5 ``publish``         ``Outcome``                        ``Outcome`` (records sent)
6 ``commit_in_order`` ``Outcome``                        Kafka (acknowledged, then committed)
====================  =================================  ======================================

Every queue is bounded (:data:`consumer.stream.QUEUE_DEPTHS`), so a slow stage holds the ones
before it back, and a backlog on the topic never grows the process's memory. Each stage ends by
putting :data:`consumer.stream.END` on its output once its input has ended. Decoding runs in the
decode pool as soon as a record is fetched (stage 1 starts it, stage 3 waits for it); a
:class:`Recognizer` decodes plain JPEGs on the device, embeds and matches, each on a single worker
thread. Delivery (stages 5 and 6) goes through a :class:`consumer.delivery.Sink`.

The catalogue a batch is matched against is the recognizer's :class:`Serving` object, read once per
batch by stage 4: a catalogue swap (:mod:`consumer.watcher`) replaces that object between two
batches, so every batch matches exactly one catalogue and its events name that one's version.

Shutdown order (SIGTERM, or ``stop`` set by the caller):

1. stop fetching: the fetch stage finishes its current poll and puts END on its queue;
2. drain: the batcher flushes its partial batch; every batch already formed is decoded (on the
   device, for plain JPEGs with a device decoder) and processed by the model;
3. publish: every event and dead letter of every batch fetched is sent;
4. flush: each batch's acknowledgements are awaited (retrying on failure);
5. commit: each batch's offsets are committed, in fetch order;
6. close: the caller stops the consumer (leaving the group) and the producer.

A rebalance runs the same drain before partitions are given up (see ``on_partitions_revoked``),
so an old owner never commits offsets of a partition that already moved.
An unexpected error in any stage cancels the others; nothing after the last acknowledged batch
is committed, so a restart re-reads those photos.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from PIL import Image as PILImage

from catalog.embedder import Embedder
from catalog.jpeg_batch import JpegBatchDecoder
from catalog.matcher import Matcher
from catalog.models import Fingerprint
from catalog.preprocess import DecodeLimits, decode, probe_plain_jpeg
from catalog.store import Calibration, Catalog, ComplianceCalibration
from consumer.batcher import batches
from consumer.delivery import Outcome, PartitionOwner, Sink, commit_in_order, publish
from consumer.facings import Frames
from consumer.health import Health, Watchdog
from consumer.messages import CatalogRef
from consumer.metrics import Metrics
from consumer.recognize import process_units
from consumer.source import Decoded, DecodedPhoto, FetchQueue, InFlight, PendingJpeg, Poison, Received, fetch
from consumer.stream import END, QUEUE_DEPTHS, EndOfStream
from consumer.unreadable import UnreadableBatches

log = logging.getLogger(__name__)
UNWATCHED = Watchdog(float("inf"))  # the stages' watchdog when the caller reads none


@dataclass(frozen=True)
class Topics:
    output: str
    dead_letter: str


@dataclass
class ReadyBatch:
    """A batch whose every record is decoded, or judged a dead letter (what stage 3 puts on its
    queue). ``decoded[i]`` belongs to ``received[i]``; ``closed`` is when the batch closed
    (``time.monotonic()``)."""

    received: list[Received]
    decoded: list[DecodedPhoto | Poison]
    closed: float


@dataclass(frozen=True)
class Serving:
    """The catalogue in use: its matrix on the device (in ``matcher``) and what events say of it.
    One object, replaced whole by a swap, so that a batch never mixes two catalogues."""

    matcher: Matcher
    ref: CatalogRef
    fingerprint: Fingerprint
    calibration: Calibration | None
    compliance: ComplianceCalibration | None  # the operating point of facing verdicts (None: the default rule)
    products: int
    references: int

    @classmethod
    def of(cls, catalog: Catalog, matcher: Matcher) -> Serving:
        fp = catalog.fingerprint
        return cls(matcher=matcher, ref=CatalogRef(version=catalog.version, model=fp.backbone, weights=fp.weights),
                   fingerprint=fp, calibration=catalog.calibration, compliance=catalog.compliance,
                   products=len(catalog.skus),
                   references=len(catalog.row_sku))


class Recognizer:
    """Recognition of a batch on the model's device: decoding its plain JPEGs (when a device
    decoder is configured), then embedding and matching. Each runs on its own single worker
    thread, off the event loop, so the next batch decodes while this one is embedded.

    ``serving`` is the catalogue photos are matched against; only the event loop replaces it."""

    def __init__(
        self, embedder: Embedder, matcher: Matcher, catalog: Catalog, jpeg_decoder: JpegBatchDecoder | None = None,
    ) -> None:
        self.embedder = embedder
        self.jpeg_decoder = jpeg_decoder
        self.serving = Serving.of(catalog, matcher)

    @property
    def matcher(self) -> Matcher:
        """The serving catalogue's matcher."""
        return self.serving.matcher

    def warm_up(self) -> float:
        """Everything the first batch would otherwise pay: graph capture or compilation, cuBLAS
        and top-k set-up for the catalogue matrix, the JPEG decoder's handles. Seconds taken."""
        start = time.perf_counter()
        self.embedder.warm_up()
        width, height = self.embedder.input_size
        example = torch.zeros((self.embedder.batch_size, 3, height, width), dtype=torch.uint8)
        self.matcher.match(self.embedder.embed(example))
        if self.jpeg_decoder is not None:
            buf = io.BytesIO()
            PILImage.new("RGB", (width, height), (128, 128, 128)).save(buf, "JPEG")
            example_jpeg = probe_plain_jpeg(buf.getvalue(), size=(width, height))
            assert example_jpeg is not None  # Pillow's baseline JPEG is plain
            self.jpeg_decoder([example_jpeg], (width, height))
        return time.perf_counter() - start

    def decode_jpegs(self, decoded: list[Decoded], limits: DecodeLimits) -> tuple[list[DecodedPhoto | Poison], int]:
        """Decode the batch's pending JPEGs together; one the device refuses is decoded by Pillow,
        which either succeeds or gives its dead-letter reason. Returns the batch and how many
        photos went to Pillow instead."""
        start = time.perf_counter()
        size = self.embedder.input_size
        pending: list[tuple[int, PendingJpeg]] = [(i, d) for i, d in enumerate(decoded) if isinstance(d, PendingJpeg)]
        out: list[DecodedPhoto | Poison] = [d for d in decoded if not isinstance(d, PendingJpeg)]
        if not pending:
            return out, 0
        if self.jpeg_decoder is None:
            raise RuntimeError("photos were left for a device decoder, but none is configured")
        try:
            tensors = self.jpeg_decoder([p.jpeg for _, p in pending], size)
        except Exception:  # whatever the device does, the photos still get decoded
            log.exception("device JPEG decoding failed for a batch of %d; decoding it with Pillow", len(pending))
            tensors = [None] * len(pending)
        share = (time.perf_counter() - start) / len(pending)
        result: list[DecodedPhoto | Poison | None] = [None if isinstance(d, PendingJpeg) else d for d in decoded]
        fallbacks = 0
        for (i, photo), pixels in zip(pending, tensors, strict=True):
            spent = share
            if pixels is None:
                fallbacks += 1
                began = time.perf_counter()
                try:
                    pixels = decode(photo.jpeg.data, size, limits).pixels
                except Exception as exc:
                    result[i] = Poison.of(exc)
                    continue
                spent += time.perf_counter() - began
            result[i] = DecodedPhoto(pixels=pixels, fields=photo.fields, width=photo.width, height=photo.height,
                                     decode_s=photo.decode_s + spent)
        return [r for r in result if r is not None], fallbacks


async def finish_decoding(
    inq: asyncio.Queue[list[Received] | EndOfStream], outq: asyncio.Queue[ReadyBatch | EndOfStream], *,
    recognizer: Recognizer | None, device_pool: Executor, limits: DecodeLimits, metrics: Metrics,
    watchdog: Watchdog | None = None,
) -> None:
    """Stage 3: wait for the batch's decodes; decode its plain JPEGs together on the device."""
    loop = asyncio.get_running_loop()
    watchdog = watchdog or UNWATCHED
    while not isinstance(batch := await inq.get(), EndOfStream):
        closed = time.monotonic()
        with watchdog.running("decode"):
            decoded: list[Decoded] = list(await asyncio.gather(*(r.decoded for r in batch)))
        if any(isinstance(d, PendingJpeg) for d in decoded):
            if recognizer is None:
                raise RuntimeError("photos were left for a device decoder, but none is configured")
            with watchdog.running("device_decode"):
                done, fallbacks = await loop.run_in_executor(device_pool, recognizer.decode_jpegs, decoded, limits)
            if fallbacks:
                metrics.device_decode_fallbacks.inc(fallbacks)
        else:
            done = [d for d in decoded if not isinstance(d, PendingJpeg)]
        for received, result in zip(batch, done, strict=True):
            if isinstance(result, DecodedPhoto):
                received.drop_value()
        await outq.put(ReadyBatch(received=batch, decoded=done, closed=closed))
    await outq.put(END)


async def process(
    inq: asyncio.Queue[ReadyBatch | EndOfStream], outq: asyncio.Queue[Outcome | EndOfStream], *,
    recognizer: Recognizer, model_pool: Executor, topics: Topics, metrics: Metrics, max_dead_letter_bytes: int,
    batch_size: int | None = None, batch_max_wait_s: float = 0.0, watchdog: Watchdog | None = None,
) -> None:
    """Stage 4: embed and match every unit (a whole photo, or a facing of a frame) in batches of
    ``batch_size`` units (default: the embedder's), each input batch against the catalogue serving
    when it starts (see :mod:`consumer.recognize`)."""
    await process_units(
        inq, outq, recognizer=recognizer, model_pool=model_pool, topics=topics, metrics=metrics,
        max_dead_letter_bytes=max_dead_letter_bytes, batch_size=batch_size or recognizer.embedder.batch_size,
        batch_max_wait_s=batch_max_wait_s, watchdog=watchdog or UNWATCHED,
    )


class DrainOnRevoke(ConsumerRebalanceListener):
    """Before partitions are given up, let everything fetched so far be published and committed;
    then tell the partition owner, if the sink is one (exactly-once mode closes those
    partitions' transactional producers). Each assignment (an empty one too) marks the member
    joined for readiness and is counted in ``shelfmatch_partition_assignments_total``."""

    def __init__(
        self, in_flight: InFlight, timeout_s: float, metrics: Metrics, owner: PartitionOwner | None,
        health: Health | None = None,
    ) -> None:
        self._health = health
        self._in_flight = in_flight
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        pending = self._in_flight.count
        if self._owner is not None:
            self._owner.revoking(revoked)
        drained = await self._in_flight.wait_idle(self._timeout_s)
        for tp in revoked:
            with contextlib.suppress(KeyError):  # no lag was recorded for it yet
                self._metrics.lag.remove(tp.topic, str(tp.partition))
        if not drained:
            log.warning("rebalance: %d photos still in flight after %.0fs; they will be re-read by the new owner",
                        self._in_flight.count, self._timeout_s)
            if self._owner is not None:
                await self._owner.drain_timed_out(revoked)
            return
        log.info("rebalance: drained %d in-flight photos before giving up %s", pending, sorted(revoked))
        if self._owner is not None:
            await self._owner.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted(assigned))
        self._metrics.assignments.inc()
        if self._health is not None and not self._health.joined:
            self._health.set(joined=True)
        if self._owner is not None:
            await self._owner.assigned(assigned)


async def run_pipeline(
    consumer: AIOKafkaConsumer, sink: Sink, *, recognizer: Recognizer, topics: Topics, decode_pool: Executor,
    model_pool: Executor, device_pool: Executor, limits: DecodeLimits, batch_size: int, batch_max_wait_s: float,
    in_flight: InFlight, metrics: Metrics, stop: asyncio.Event, poll_every_s: float,
    unreadable: UnreadableBatches | None = None, watchdog: Watchdog | None = None, frames: Frames | None = None,
) -> None:
    """Run every stage until ``stop`` is set and the last fetched batch is committed. The decode
    and model stages report their work to ``watchdog``. With ``frames``, photos with regions are
    matched facing by facing (:mod:`consumer.facings`)."""
    watchdog = watchdog or UNWATCHED
    size = recognizer.embedder.input_size
    fetched = FetchQueue(maxsize=QUEUE_DEPTHS.fetched(batch_size))
    batched: asyncio.Queue[list[Received] | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.batched)
    ready: asyncio.Queue[ReadyBatch | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.ready)
    processed: asyncio.Queue[Outcome | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.processed)
    sent: asyncio.Queue[Outcome | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.sent)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(fetch(
            consumer, fetched, pool=decode_pool, size=size, limits=limits, stop=stop,
            in_flight=in_flight, metrics=metrics, max_records=batch_size, poll_every_s=poll_every_s,
            device_jpeg=recognizer.jpeg_decoder is not None, unreadable=unreadable, frames=frames,
        ), name="fetch")
        tg.create_task(batches(fetched, batched, max_size=batch_size, max_wait_s=batch_max_wait_s), name="batch")
        tg.create_task(finish_decoding(
            batched, ready, recognizer=recognizer, device_pool=device_pool, limits=limits, metrics=metrics,
            watchdog=watchdog,
        ), name="finish-decoding")
        tg.create_task(process(
            ready, processed, recognizer=recognizer, model_pool=model_pool, topics=topics, metrics=metrics,
            max_dead_letter_bytes=limits.max_bytes, watchdog=watchdog,
            # The input batches were formed by size-or-timeout already: a second wait would add
            # the max wait again to every partial batch at low load. Units already queued (the
            # rest of a frame's facings, the next batch's photos) still fill a model batch.
            batch_size=batch_size, batch_max_wait_s=0.0,
        ), name="process")
        tg.create_task(publish(processed, sent, sink), name="publish")
        tg.create_task(commit_in_order(sent, sink, in_flight), name="commit")
