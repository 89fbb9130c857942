"""Stage 4, recognition: facings are the unit of micro-batching.

A photo matched whole is one unit (its pixels at the model's size); a photo with regions is one
unit per facing, cut from its frame on the model's device (:func:`consumer.facings.crop`). Inside
the stage, three steps run as tasks of one TaskGroup, joined by bounded queues:

====================  =================================  ======================================
step                  reads                              writes
====================  =================================  ======================================
``cut``               ``ReadyBatch``                     ``Unit`` per facing; the batch's ``Job``
``batches``           ``Unit``                           ``list[Unit]`` of up to the batch size
``recognize``         ``list[Unit]``                     each unit's ``Match``, on its ``Job``
``assemble``          ``Job`` (in fetch order)           ``Outcome`` once all its units matched
====================  =================================  ======================================

Units of every photo go through the same size-or-timeout batcher, so a frame of 40 facings
spans two batches of 32, and its last 8 facings share a batch with the next photos. A photo's
event is made when its last facing is matched, and a batch's :class:`Outcome` (its events and
dead letters, and the offsets to commit after them) when all its photos are: offsets still move
only after the events are acknowledged (stages 5 and 6), in fetch order.

Each input batch is matched against the catalogue serving when it is cut (``Job.serving``), so a
photo's facings all name one catalogue even when a swap lands between two model batches.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch
from aiokafka import TopicPartition

from catalog.compliance import FacingVerdict, judge, summarise
from catalog.matcher import Match
from consumer.batcher import batches
from consumer.delivery import Outcome, OutRecord
from consumer.facings import Facing, crop
from consumer.health import Watchdog
from consumer.messages import (
    Box,
    Candidate,
    ComplianceEvent,
    FacingResult,
    FrameSummary,
    Latency,
    MatchEvent,
    OperatingPoint,
    Photo,
    PlanogramRef,
    Source,
    dead_letter_headers,
    event_id,
)
from consumer.metrics import Metrics
from consumer.source import DecodedPhoto, Poison
from consumer.stream import END, QUEUE_DEPTHS, EndOfStream

NO_PIXELS: torch.Tensor = torch.empty((3, 0, 0), dtype=torch.uint8)

if TYPE_CHECKING:
    from consumer.pipeline import ReadyBatch, Recognizer, Serving, Topics


@dataclass
class PhotoWork:
    """One decoded photo on its way: a result per unit, filled in as model batches finish (a
    :class:`Match` for a whole photo, a :class:`catalog.compliance.FacingVerdict` per facing)."""

    photo: DecodedPhoto  # without its pixels (``photo.pixels`` is empty): events need only the rest
    matches: list[Match | FacingVerdict | None]
    # Held only until the photo's last unit is embedded: a matched frame waiting for its batch's
    # other photos, for publishing and for its commit holds no pixels.
    pixels: torch.Tensor | None = None
    embed_s: float = 0.0
    match_s: float = 0.0
    model_batch: int = 0  # units in the last model batch that carried one of its units


@dataclass
class Job:
    """An input batch in recognition: its photos, the catalogue they are matched against, and
    a future that completes when the last of their units is matched."""

    ready: ReadyBatch
    serving: Serving
    photos: list[PhotoWork]
    remaining: int
    done: asyncio.Future[None] = field(repr=False)

    def unit_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


@dataclass(frozen=True)
class Unit:
    """One image for the model: a whole photo (``facing`` None) or one facing of a frame."""

    job: Job
    work: PhotoWork
    index: int
    facing: Facing | None


async def process_units(
    inq: asyncio.Queue[ReadyBatch | EndOfStream], outq: asyncio.Queue[Outcome | EndOfStream], *,
    recognizer: Recognizer, model_pool: Executor, topics: Topics, metrics: Metrics, max_dead_letter_bytes: int,
    batch_size: int, batch_max_wait_s: float, watchdog: Watchdog,
) -> None:
    """Stage 4: cut, batch, embed and match units; put each input batch's Outcome on ``outq``.
    Each model call is reported to ``watchdog`` as the ``model`` stage."""
    units: asyncio.Queue[Unit | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.fetched(batch_size))
    unit_batches: asyncio.Queue[list[Unit] | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.ready)
    jobs: asyncio.Queue[Job | EndOfStream] = asyncio.Queue(maxsize=QUEUE_DEPTHS.recognizing)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(cut(inq, units, jobs, recognizer=recognizer), name="cut")
        tg.create_task(batches(units, unit_batches, max_size=batch_size, max_wait_s=batch_max_wait_s),
                       name="unit-batch")
        tg.create_task(recognize(unit_batches, recognizer=recognizer, model_pool=model_pool, metrics=metrics,
                                 watchdog=watchdog), name="recognize")
        tg.create_task(assemble(jobs, outq, topics=topics, metrics=metrics,
                                max_dead_letter_bytes=max_dead_letter_bytes), name="assemble")


async def cut(
    inq: asyncio.Queue[ReadyBatch | EndOfStream], units: asyncio.Queue[Unit | EndOfStream],
    jobs: asyncio.Queue[Job | EndOfStream], *, recognizer: Recognizer,
) -> None:
    """Turn each input batch into its units, in order; hand its Job to ``assemble`` first, so
    that the batch's outcome is awaited in fetch order."""
    loop = asyncio.get_running_loop()
    while not isinstance(ready := await inq.get(), EndOfStream):
        photos = []
        for i, d in enumerate(ready.decoded):
            if isinstance(d, DecodedPhoto):
                ready.decoded[i] = light = replace(d, pixels=NO_PIXELS)
                photos.append(PhotoWork(light, [None] * (len(d.regions.facings) if d.regions else 1), d.pixels))
        total = sum(len(p.matches) for p in photos)
        job = Job(ready=ready, serving=recognizer.serving, photos=photos, remaining=total, done=loop.create_future())
        if total == 0:
            job.done.set_result(None)
        await jobs.put(job)
        for work in photos:
            facings: tuple[Facing | None, ...] = work.photo.regions.facings if work.photo.regions else (None,)
            for i, facing in enumerate(facings):
                await units.put(Unit(job=job, work=work, index=i, facing=facing))
    await units.put(END)
    await jobs.put(END)


def _groups(batch: list[Unit]) -> Iterator[list[Unit]]:
    """Consecutive units of one photo (a frame's facings are cut together)."""
    start = 0
    for i in range(1, len(batch) + 1):
        if i == len(batch) or batch[i].work is not batch[start].work:
            yield batch[start:i]
            start = i


def embed_units(recognizer: Recognizer, batch: list[Unit]) -> tuple[torch.Tensor, float]:
    """Cut the facings of a batch on the model's device and embed every unit in one forward
    pass (runs on the model thread). Returns the vectors, in unit order, and the seconds taken."""
    start = time.perf_counter()
    embedder = recognizer.embedder
    images: list[torch.Tensor] = []
    for group in _groups(batch):
        pixels = group[0].work.pixels
        assert pixels is not None, "a photo's pixels were released before all its units were embedded"
        if group[0].facing is None:
            images.extend(pixels.to(embedder.device) for _ in group)
        else:
            images.extend(crop(pixels, [u.facing for u in group if u.facing is not None], embedder.input_size,
                               embedder.device).unbind(0))
    vectors = embedder.embed(torch.stack(images))
    if vectors.device.type == "cuda":
        torch.cuda.synchronize(vectors.device)
    return vectors, time.perf_counter() - start


# Candidates per facing in a ComplianceEvent, at most: an event grows with facings x candidates
# (1,000 facings at SHELFMATCH_TOP_K=100 would be ~5 MB, over most topics' max.message.bytes, and a
# refused event holds its partition); the verdict needs only the expected SKU and the best others.
FACING_TOP_K = 5

# The expected SKU of a detector box that no planogram slot covers: no product is expected there,
# so catalog.compliance.judge calls it empty or unknown, never ok or wrong-product.
NOTHING_EXPECTED = ""


def match_units(batch: list[Unit], vectors: torch.Tensor) -> float:
    """Match each unit against its own job's catalogue (usually one for the whole batch): a whole
    photo gets top-k and a verdict, a facing its compliance verdict (:func:`catalog.compliance.judge`
    with the catalogue's operating point)."""
    start = time.perf_counter()
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, u in enumerate(batch):
        groups.setdefault((id(u.job.serving), u.facing is None), []).append(i)
    for (_, whole), rows in groups.items():
        serving = batch[rows[0]].job.serving
        results: list[Match | FacingVerdict]
        if whole:
            results = list(serving.matcher.match(vectors[rows]))
        else:
            facings = [f for f in (batch[i].facing for i in rows) if f is not None]
            results = list(judge(
                serving.matcher.scores(vectors[rows]), serving.matcher.skus,
                [f.expected_sku or NOTHING_EXPECTED for f in facings],
                [f.slot or f.box_id or "" for f in facings],
                calibration=serving.compliance, top_k=min(serving.matcher.top_k, FACING_TOP_K),
            ))
        for i, result in zip(rows, results, strict=True):
            batch[i].work.matches[batch[i].index] = result
    return time.perf_counter() - start


async def recognize(
    inq: asyncio.Queue[list[Unit] | EndOfStream], *, recognizer: Recognizer, model_pool: Executor, metrics: Metrics,
    watchdog: Watchdog,
) -> None:
    """Embed and match each batch of units on the model thread; mark the units done."""
    loop = asyncio.get_running_loop()

    def run(batch: list[Unit]) -> tuple[float, float]:
        vectors, embed_s = embed_units(recognizer, batch)
        return embed_s, match_units(batch, vectors)

    while not isinstance(batch := await inq.get(), EndOfStream):
        with watchdog.running("model"):
            embed_s, match_s = await loop.run_in_executor(model_pool, run, batch)
        metrics.stage.labels("embed").observe(embed_s)
        metrics.stage.labels("match").observe(match_s)
        seen: set[int] = set()
        for u in batch:
            if id(u.work) not in seen:
                seen.add(id(u.work))
                u.work.embed_s += embed_s
                u.work.match_s += match_s
                u.work.model_batch = len(batch)
            u.job.unit_done()
            if all(m is not None for m in u.work.matches):
                u.work.pixels = None


async def assemble(
    inq: asyncio.Queue[Job | EndOfStream], outq: asyncio.Queue[Outcome | EndOfStream], *, topics: Topics,
    metrics: Metrics, max_dead_letter_bytes: int,
) -> None:
    """Wait for each job in turn, then build its outcome (events in input order)."""
    while not isinstance(job := await inq.get(), EndOfStream):
        await job.done
        ready = job.ready
        metrics.batch_size.observe(len(ready.received))
        for r, d in zip(ready.received, ready.decoded, strict=True):
            metrics.stage.labels("batch_wait").observe(ready.closed - r.arrived)
            if isinstance(d, DecodedPhoto):
                metrics.stage.labels("decode").observe(d.decode_s)
        await outq.put(build_outcome(job, topics=topics, max_dead_letter_bytes=max_dead_letter_bytes))
    await outq.put(END)


def _facing_result(facing: Facing, v: FacingVerdict) -> FacingResult:
    r = facing.region
    best_sku, best_score = v.candidates[0]
    return FacingResult(
        slot=facing.slot, box_id=facing.box_id, region=Box(x0=r.x0, y0=r.y0, x1=r.x1, y1=r.y1),
        expected_sku=facing.expected_sku, status=v.status.value, best=Candidate(sku=best_sku, score=best_score),
        margin=v.margin, expected_score=v.expected_score, empty_score=v.empty_score,
        candidates=[Candidate(sku=s, score=score) for s, score in v.candidates],
    )


def build_outcome(job: Job, *, topics: Topics, max_dead_letter_bytes: int) -> Outcome:
    """Turn a recognised input batch into output records, in input order, plus its commit
    offsets: a MatchEvent per whole photo, a ComplianceEvent per photo with regions, a dead
    letter per poison record."""
    ready, serving = job.ready, job.serving
    records: list[OutRecord] = []
    offsets: dict[TopicPartition, int] = {}
    works = iter(job.photos)
    now = datetime.now(UTC)
    created = time.monotonic()
    for received, result in zip(ready.received, ready.decoded, strict=True):
        rec = received.record
        tp = TopicPartition(rec.topic, rec.partition)
        offsets[tp] = max(offsets.get(tp, 0), rec.offset + 1)
        if isinstance(result, Poison):
            value = rec.value or b""
            truncated = len(value) if len(value) > max_dead_letter_bytes else None
            records.append(OutRecord(
                source=tp, topic=topics.dead_letter, value=value[:max_dead_letter_bytes], key=rec.key,
                headers=dead_letter_headers(
                    list(rec.headers), reason=result.reason, error=result.error, topic=rec.topic,
                    partition=rec.partition, offset=rec.offset, truncated_from=truncated,
                    first_offset=result.first_offset,
                ),
                source_timestamp_ms=rec.timestamp, dead_letter=result.reason,
            ))
            continue
        work = next(works)
        assert all(m is not None for m in work.matches), "an event was built before all its facings were matched"
        common: dict[str, Any] = dict(
            event_id=event_id(rec.topic, rec.partition, rec.offset),
            source=Source(topic=rec.topic, partition=rec.partition, offset=rec.offset, timestamp_ms=rec.timestamp),
            photo=Photo(width=result.width, height=result.height, **result.fields),
            catalog=serving.ref,
            latency_ms=Latency(
                decode=round(result.decode_s * 1e3, 3),
                batch_wait=round((ready.closed - received.arrived) * 1e3, 3),
                embed=round(work.embed_s * 1e3, 3),
                match=round(work.match_s * 1e3, 3),
                pipeline=round((created - received.arrived) * 1e3, 3),
            ),
            processed_at=now,
        )
        event: MatchEvent | ComplianceEvent
        statuses: tuple[tuple[str, int], ...] = ()
        if result.regions is None:
            m = work.matches[0]
            assert isinstance(m, Match)
            best_sku, best_score = m.best
            event = MatchEvent(
                verdict=m.verdict.value, best=Candidate(sku=best_sku, score=best_score), margin=m.margin,
                candidates=[Candidate(sku=s, score=v) for s, v in m.candidates], batch_size=work.model_batch,
                threshold=serving.matcher.threshold, min_margin=serving.matcher.min_margin, **common,
            )
            verdict: str = m.verdict.value
        else:
            regions = result.regions
            verdicts = [v for v in work.matches if isinstance(v, FacingVerdict)]
            facings = [_facing_result(f, v) for f, v in zip(regions.facings, verdicts, strict=True)]
            statuses = tuple(Counter(f.status for f in facings).items())
            planogram = regions.planogram
            summary = summarise(verdicts, planogram.version if planogram is not None else "")
            event = ComplianceEvent(
                regions_from=regions.origin, facings=facings, summary=FrameSummary(
                    facings=summary.facings, counts=dict(summary.counts),  # type: ignore[arg-type]
                    compliance=summary.compliance, share_of_shelf=dict(summary.share_of_shelf)),
                planogram=PlanogramRef(camera_id=planogram.camera_id, version=planogram.version)
                if planogram is not None else None,
                operating_point=OperatingPoint(**vars(serving.compliance)) if serving.compliance is not None else None,
                **common,
            )
            verdict = "compliance"
        records.append(OutRecord(
            source=tp, topic=topics.output, value=event.model_dump_json().encode(), key=rec.key,
            headers=[("content-type", b"application/json")], source_timestamp_ms=rec.timestamp,
            verdict=verdict, facings=statuses,
        ))
    return Outcome(records=records, offsets=offsets, photos=len(ready.received))
