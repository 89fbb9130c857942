"""The stages wired together: fetch -> batch -> finish decoding -> process -> publish -> settle.

Each stage is one task reading a bounded queue and writing the next, so a slow stage holds the
ones before it back (and a backlog on the topic never grows the process's memory).

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
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import torch
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from PIL import Image as PILImage

from catalog.embedder import Embedder
from catalog.jpeg_batch import JpegBatchDecoder
from catalog.matcher import Match, Matcher
from catalog.preprocess import DecodeLimits, decode, probe_plain_jpeg, to_tensor
from catalog.store import Catalog
from consumer.batcher import batches
from consumer.messages import (
    Candidate,
    CatalogRef,
    Latency,
    MatchEvent,
    Source,
    dead_letter_headers,
    event_id,
)
from consumer.messages import (
    Photo as PhotoInfo,
)
from consumer.metrics import Metrics
from consumer.sink import Outcome, OutRecord, Sink, publish, settle
from consumer.source import END, FetchQueue, InFlight, Photo, Poison, Received, fetch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    output: str
    dead_letter: str


class Model:
    """The device's work on a batch: decoding plain JPEGs (when a device decoder is configured),
    then embedding and matching. Each runs on its own single worker thread, off the event loop,
    so the next batch decodes while this one is embedded."""

    def __init__(
        self, embedder: Embedder, matcher: Matcher, catalog: Catalog, jpeg_decoder: JpegBatchDecoder | None = None,
    ) -> None:
        self.embedder = embedder
        self.matcher = matcher
        self.jpeg_decoder = jpeg_decoder
        self.catalog_ref = CatalogRef(
            version=catalog.version, model=catalog.fingerprint.backbone, weights=catalog.fingerprint.weights
        )

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
            self.jpeg_decoder([probe_plain_jpeg(buf.getvalue(), size=(width, height))], (width, height))
        return time.perf_counter() - start

    def decode_jpegs(self, decoded: list[Photo | Poison], limits: DecodeLimits) -> tuple[list[Photo | Poison], int]:
        """Decode the batch's plain JPEGs together; one the device refuses is decoded by Pillow,
        which either succeeds or gives its dead-letter reason. Returns the batch and how many
        photos went to Pillow instead."""
        start = time.perf_counter()
        size = self.embedder.input_size
        pending = [i for i, d in enumerate(decoded) if isinstance(d, Photo) and d.pixels is None]
        if not pending:
            return decoded, 0
        if self.jpeg_decoder is None:
            raise RuntimeError("photos were left for a device decoder, but none is configured")
        try:
            tensors = self.jpeg_decoder([decoded[i].jpeg for i in pending], size)
        except Exception:  # whatever the device does, the photos still get decoded
            log.exception("device JPEG decoding failed for a batch of %d; decoding it with Pillow", len(pending))
            tensors = [None] * len(pending)
        share = (time.perf_counter() - start) / len(pending)
        out = list(decoded)
        fallbacks = 0
        for i, pixels in zip(pending, tensors, strict=True):
            photo = decoded[i]
            if pixels is None:
                fallbacks += 1
                began = time.perf_counter()
                try:
                    pixels = to_tensor(decode(photo.jpeg.data, size, limits).image)
                except Exception as exc:
                    out[i] = Poison.of(exc)
                    continue
                share += time.perf_counter() - began
            out[i] = replace(photo, pixels=pixels, jpeg=None, decode_s=photo.decode_s + share)
        return out, fallbacks

    def __call__(self, images: list[torch.Tensor]) -> tuple[list[Match], float, float]:
        """Embed and match decoded photos (uint8 (3, H, W) each, on the CPU or the device)."""
        start = time.perf_counter()
        if any(img.device != images[0].device for img in images):
            images = [img.to(self.embedder.device) for img in images]
        vectors = self.embedder.embed(torch.stack(images))
        if vectors.device.type == "cuda":
            torch.cuda.synchronize(vectors.device)
        embedded = time.perf_counter()
        matches = self.matcher.match(vectors)
        return matches, embedded - start, time.perf_counter() - embedded


def build_outcome(
    batch: list[Received], decoded: list[Photo | Poison], matches: list[Match], *, model: Model,
    topics: Topics, closed: float, embed_s: float, match_s: float, max_dead_letter_bytes: int,
) -> Outcome:
    """Turn a processed batch into output records, in input order, plus its commit offsets."""
    records: list[OutRecord] = []
    offsets: dict[TopicPartition, int] = {}
    photos_in_batch = sum(isinstance(d, Photo) for d in decoded)
    match_iter = iter(matches)
    now = datetime.now(UTC)
    created = time.monotonic()
    for received, result in zip(batch, decoded, strict=True):
        rec = received.record
        tp = TopicPartition(rec.topic, rec.partition)
        offsets[tp] = max(offsets.get(tp, 0), rec.offset + 1)
        if isinstance(result, Poison):
            value = rec.value or b""
            truncated = len(value) if len(value) > max_dead_letter_bytes else None
            records.append(OutRecord(
                source=tp,
                topic=topics.dead_letter,
                value=value[:max_dead_letter_bytes],
                key=rec.key,
                headers=dead_letter_headers(
                    list(rec.headers), reason=result.reason, error=result.error, topic=rec.topic,
                    partition=rec.partition, offset=rec.offset, truncated_from=truncated,
                ),
                source_timestamp_ms=rec.timestamp,
                dead_letter=result.reason,
            ))
            continue
        m = next(match_iter)
        best_sku, best_score = m.best
        event = MatchEvent(
            event_id=event_id(rec.topic, rec.partition, rec.offset),
            source=Source(topic=rec.topic, partition=rec.partition, offset=rec.offset, timestamp_ms=rec.timestamp),
            photo=PhotoInfo(width=result.width, height=result.height, **result.fields),
            catalog=model.catalog_ref,
            verdict=m.verdict.value,
            best=Candidate(sku=best_sku, score=best_score),
            margin=m.margin,
            candidates=[Candidate(sku=s, score=v) for s, v in m.candidates],
            threshold=model.matcher.threshold,
            min_margin=model.matcher.min_margin,
            batch_size=photos_in_batch,
            latency_ms=Latency(
                decode=round(result.decode_s * 1e3, 3),
                batch_wait=round((closed - received.arrived) * 1e3, 3),
                embed=round(embed_s * 1e3, 3),
                match=round(match_s * 1e3, 3),
                pipeline=round((created - received.arrived) * 1e3, 3),
            ),
            processed_at=now,
        )
        records.append(OutRecord(
            source=tp, topic=topics.output, value=event.model_dump_json().encode(), key=rec.key,
            headers=[("content-type", b"application/json")], source_timestamp_ms=rec.timestamp,
            verdict=m.verdict.value,
        ))
    return Outcome(records=records, offsets=offsets, photos=len(batch))


async def finish_decoding(
    inq: asyncio.Queue, outq: asyncio.Queue, *, model: Model, device_pool: Executor, limits: DecodeLimits,
    metrics: Metrics,
) -> None:
    """Stage 3: wait for the batch's decodes; decode its plain JPEGs together on the device."""
    loop = asyncio.get_running_loop()
    while (batch := await inq.get()) is not END:
        closed = time.monotonic()
        decoded = await asyncio.gather(*(r.decoded for r in batch))
        if any(isinstance(d, Photo) and d.pixels is None for d in decoded):
            decoded, fallbacks = await loop.run_in_executor(device_pool, model.decode_jpegs, decoded, limits)
            if fallbacks:
                metrics.device_decode_fallbacks.inc(fallbacks)
        for received, result in zip(batch, decoded, strict=True):
            if isinstance(result, Photo):
                received.drop_value()
        await outq.put((batch, decoded, closed))
    await outq.put(END)


async def process(
    inq: asyncio.Queue, outq: asyncio.Queue, *, model: Model, model_pool: Executor, topics: Topics,
    metrics: Metrics, max_dead_letter_bytes: int,
) -> None:
    """Stage 4: embed and match the good photos of a batch in one go."""
    loop = asyncio.get_running_loop()
    while (item := await inq.get()) is not END:
        batch, decoded, closed = item
        photos = [d for d in decoded if isinstance(d, Photo)]
        matches: list[Match] = []
        embed_s = match_s = 0.0
        if photos:
            images = [p.pixels for p in photos]
            matches, embed_s, match_s = await loop.run_in_executor(model_pool, model, images)
            metrics.stage.labels("embed").observe(embed_s)
            metrics.stage.labels("match").observe(match_s)
        metrics.batch_size.observe(len(batch))
        for r, d in zip(batch, decoded, strict=True):
            metrics.stage.labels("batch_wait").observe(closed - r.arrived)
            if isinstance(d, Photo):
                metrics.stage.labels("decode").observe(d.decode_s)
        await outq.put(build_outcome(
            batch, decoded, matches, model=model, topics=topics, closed=closed, embed_s=embed_s,
            match_s=match_s, max_dead_letter_bytes=max_dead_letter_bytes,
        ))
    await outq.put(END)


class DrainOnRevoke(ConsumerRebalanceListener):
    """Before partitions are given up, let everything fetched so far be published and committed;
    then tell the sink (exactly-once mode closes those partitions' transactional producers)."""

    def __init__(self, in_flight: InFlight, timeout_s: float, metrics: Metrics, sink) -> None:
        self._in_flight = in_flight
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        pending = self._in_flight.count
        self._sink.revoking(revoked)
        drained = await self._in_flight.wait_idle(self._timeout_s)
        for tp in revoked:
            with contextlib.suppress(KeyError):  # no lag was recorded for it yet
                self._metrics.lag.remove(tp.topic, str(tp.partition))
        if not drained:
            log.warning("rebalance: %d photos still in flight after %.0fs; they will be re-read by the new owner",
                        self._in_flight.count, self._timeout_s)
            await self._sink.drain_timed_out(revoked)
            return
        log.info("rebalance: drained %d in-flight photos before giving up %s", pending, sorted(revoked))
        await self._sink.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted(assigned))
        await self._sink.assigned(assigned)


async def run_pipeline(
    consumer: AIOKafkaConsumer, sink: Sink, *, model: Model, topics: Topics, decode_pool: Executor,
    model_pool: Executor, device_pool: Executor, limits: DecodeLimits, batch_size: int, batch_max_wait_s: float,
    in_flight: InFlight, metrics: Metrics, stop: asyncio.Event, poll_every_s: float,
) -> None:
    """Run every stage until ``stop`` is set and the last fetched batch is committed."""
    size = model.embedder.input_size
    fetched = FetchQueue(maxsize=2 * batch_size)
    batched: asyncio.Queue = asyncio.Queue(maxsize=2)
    ready: asyncio.Queue = asyncio.Queue(maxsize=1)
    processed: asyncio.Queue = asyncio.Queue(maxsize=2)
    sent: asyncio.Queue = asyncio.Queue(maxsize=4)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(fetch(
            consumer, fetched, pool=decode_pool, size=size, limits=limits, stop=stop,
            in_flight=in_flight, metrics=metrics, max_records=batch_size, poll_every_s=poll_every_s,
            device_jpeg=model.jpeg_decoder is not None,
        ), name="fetch")
        tg.create_task(batches(fetched, batched, max_size=batch_size, max_wait_s=batch_max_wait_s), name="batch")
        tg.create_task(finish_decoding(
            batched, ready, model=model, device_pool=device_pool, limits=limits, metrics=metrics,
        ), name="finish-decoding")
        tg.create_task(process(
            ready, processed, model=model, model_pool=model_pool, topics=topics, metrics=metrics,
            max_dead_letter_bytes=limits.max_bytes,
        ), name="process")
        tg.create_task(publish(processed, sent, sink), name="publish")
        tg.create_task(settle(sent, sink, in_flight), name="settle")
