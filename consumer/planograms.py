"""Planograms in force, per camera, and the two places they come from.

Both sources implement :class:`PlanogramSource`: ``records()`` yields :class:`PlanogramRecord`
(a camera id and the record's JSON, or ``None`` for a tombstone), then :data:`UP_TO_DATE` once
everything that existed at start has been read. The file source
(``SHELFMATCH_PLANOGRAMS``, for small sites) then ends; the topic source
(``SHELFMATCH_PLANOGRAM_TOPIC``) goes on, so that a planogram published later applies without a
restart.

The topic is compacted and keyed by camera id. Every replica reads all of it, from the
beginning, with a plain consumer that is assigned every partition (no group: it commits
nothing and never rebalances), so each one holds every camera's planogram whatever input
partitions it owns. The latest record per camera wins; a tombstone (null value) removes the
camera's planogram, and its photos go back to being matched whole.

:class:`PlanogramTable` applies records: one that does not validate (not JSON, a region outside
the frame, overlapping slots, an SKU the catalogue lacks, a key naming another camera than its
body) is logged with its reason and counted in ``shelfmatch_planogram_rejections_total{reason}``,
and the camera's previous planogram stays in force.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from catalog.errors import PlanogramError
from catalog.planogram import Planogram, PlanogramReason, parse_planogram
from consumer.errors import ConfigurationError
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

CAMERA_MISMATCH = "camera-mismatch"
METADATA_WAIT_S = 30.0


@dataclass(frozen=True)
class PlanogramRecord:
    """One planogram record: ``value`` None is a tombstone (the camera's planogram is removed)."""

    camera_id: str
    value: bytes | None
    origin: str  # where it was read, for log lines: "file:3" or "topic/partition/offset"


class UpToDate:
    """The type of :data:`UP_TO_DATE`."""

    def __repr__(self) -> str:
        return "UP_TO_DATE"


UP_TO_DATE: Final = UpToDate()


class PlanogramSource(Protocol):
    """Where planograms come from."""

    def records(self) -> AsyncIterator[PlanogramRecord | UpToDate]:
        """Every record there is, then :data:`UP_TO_DATE`, then (for a live source) later ones."""
        ...


class PlanogramTable:
    """The planograms in force, by camera id. ``snapshot()`` is an immutable mapping replaced
    whole on every change, so decode threads read one consistent set without a lock."""

    def __init__(self, metrics: Metrics, skus: Callable[[], Collection[str]]) -> None:
        self._metrics = metrics
        self._skus = skus
        self._current: Mapping[str, Planogram] = MappingProxyType({})

    def snapshot(self) -> Mapping[str, Planogram]:
        return self._current

    def _refuse(self, record: PlanogramRecord, reason: str, why: str) -> Planogram | None:
        """Count and log a refused record; the camera's planogram in force (if any) stays."""
        self._metrics.planogram_rejections.labels(reason).inc()
        kept = self._current.get(record.camera_id)
        log.warning("planogram for camera %s refused (%s, %s): %s; %s", record.camera_id, reason, record.origin,
                    why, f"version {kept.version} stays in force" if kept else "none in force")
        return kept

    def apply(self, record: PlanogramRecord) -> Planogram | None:
        """Apply one record; returns the planogram now in force for its camera (None if removed).
        A record that does not validate changes nothing."""
        current = dict(self._current)
        if record.value is None:
            if current.pop(record.camera_id, None) is not None:
                log.info("planogram of camera %s removed (%s)", record.camera_id, record.origin)
            self._set(current)
            return None
        try:
            planogram = parse_planogram(record.value, skus=self._skus())
            if planogram.camera_id != record.camera_id:
                raise PlanogramError(CAMERA_MISMATCH, f"record key names camera {record.camera_id!r}, its planogram "
                                     f"camera {planogram.camera_id!r}")
        except PlanogramError as exc:
            return self._refuse(record, exc.reason, str(exc))
        except Exception as exc:  # recorded (metric, log); one record must never stop the service
            log.exception("planogram for camera %s could not be read", record.camera_id)
            return self._refuse(record, PlanogramReason.MALFORMED, f"{type(exc).__name__}: {exc}")
        current[record.camera_id] = planogram
        log.info("planogram %s of camera %s in force (%d slots, %s)", planogram.version, record.camera_id,
                 len(planogram.slots), record.origin)
        self._set(current)
        return planogram

    def _set(self, current: dict[str, Planogram]) -> None:
        self._current = MappingProxyType(current)
        self._metrics.planograms.set(len(current))

    async def follow(self, source: PlanogramSource, up_to_date: asyncio.Event | None = None) -> None:
        """Apply every record of ``source`` until it ends; ``up_to_date`` is set once what the
        source held at start is applied."""
        async for record in source.records():
            if isinstance(record, UpToDate):
                if up_to_date is not None:
                    up_to_date.set()
            else:
                self.apply(record)


class FilePlanograms:
    """Planograms from a JSON file read at start: an array of planogram objects, each naming its
    camera (``camera_id``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[PlanogramRecord]:
        """The file's records; an unreadable file or one that is not a JSON array is a
        configuration error (a single bad planogram in it is only refused)."""
        try:
            items = json.loads(self.path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigurationError(f"cannot read planograms from {self.path} (SHELFMATCH_PLANOGRAMS): {exc}") from exc
        if not isinstance(items, list):
            raise ConfigurationError(f"{self.path} (SHELFMATCH_PLANOGRAMS) must hold a JSON array of planograms")
        return [PlanogramRecord(camera_id=_camera_of(item, n), value=json.dumps(item).encode(),
                                origin=f"{self.path.name}[{n}]") for n, item in enumerate(items)]

    async def records(self) -> AsyncIterator[PlanogramRecord | UpToDate]:
        for record in self.read():
            yield record
        yield UP_TO_DATE


def _camera_of(item: Any, n: int) -> str:
    camera = item.get("camera_id") if isinstance(item, dict) else None
    return camera if isinstance(camera, str) else f"<entry {n} without camera_id>"


class TopicPlanograms:
    """Planograms from a compacted topic keyed by camera id, read whole by every replica."""

    def __init__(self, topic: str, config: Mapping[str, Any], *, poll_timeout_ms: int = 1000) -> None:
        self.topic = topic
        # No group: nothing is committed, and every replica is assigned every partition.
        self._config = {k: v for k, v in config.items()
                        if k not in ("group_id", "enable_auto_commit", "auto_offset_reset", "isolation_level")}
        self._poll_timeout_ms = poll_timeout_ms

    async def records(self) -> AsyncIterator[PlanogramRecord | UpToDate]:
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                    isolation_level="read_committed", **self._config)
        await consumer.start()
        try:
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            behind = {tp for tp in tps if ends[tp] > 0}
            if not behind:
                yield UP_TO_DATE
            while True:
                batch = await consumer.getmany(timeout_ms=self._poll_timeout_ms)
                for tp, records in batch.items():
                    for r in records:
                        if r.key is None:
                            log.warning("planogram record without a key ignored (%s/%d/%d)", tp.topic, tp.partition,
                                        r.offset)
                            continue
                        yield PlanogramRecord(camera_id=r.key.decode("utf-8", "replace"), value=r.value,
                                              origin=f"{tp.topic}/{tp.partition}/{r.offset}")
                if behind:
                    # Compaction and transaction markers leave gaps: caught up once the position
                    # passes the end offset seen at start.
                    for tp in list(behind):
                        if await consumer.position(tp) >= ends[tp]:
                            behind.discard(tp)
                    if not behind:
                        yield UP_TO_DATE
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """Every partition of the topic. Assigning its partition 0 makes the client fetch the
        topic's metadata, which then names them all."""
        if self.topic not in await consumer.topics():
            raise ConfigurationError(f"planogram topic {self.topic} (SHELFMATCH_PLANOGRAM_TOPIC) does not exist; "
                                     "`shelfmatch topics create` makes it")
        consumer.assign([TopicPartition(self.topic, 0)])
        async with asyncio.timeout(METADATA_WAIT_S):
            # aiokafka's public API has no event for metadata arriving; this bounded poll is the wait.
            while (partitions := consumer.partitions_for_topic(self.topic)) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return [TopicPartition(self.topic, p) for p in sorted(partitions)]
