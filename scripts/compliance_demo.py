"""The planogram compliance part of `make demo` (scripts/demo.py runs it after the photos).

1. the demo catalogue gains the reserved empty-shelf entry and an operating point:
   `shelfmatch catalog calibrate-compliance --photos` on frames composed from the demo photos
   (seed 1; the demo's own frames use other seeds, but the same photos: it flatters the table);
2. a few shelf frames are composed from the demo's store photos (catalog.shelf.compose_frame:
   a synthetic bay, some facings swapped for another product, some left empty), and their
   planograms are published to a compacted planogram topic keyed by camera id;
3. `shelfmatch consume` runs with SHELFMATCH_PLANOGRAM_TOPIC; the frames are streamed;
4. one ComplianceEvent per frame is read back: a per-slot table (expected, seen, status,
   against the composed truth) is printed and a PNG per frame is written with its slots
   coloured by status (catalog.render.render_compliance).
"""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from catalog.compliance import FacingStatus, FacingVerdict
from catalog.render import render_compliance
from catalog.shelf import ShelfFrame, compose_frame

FRAMES = 3
# The operating point must reach 95% wrong-product precision with 99% confidence: ~30 frames at least.
CALIBRATION_FRAMES = 40
TIMEOUT_S = 300


def shelf_catalog(catalog_path: Path, photos_dir: Path, out: Path) -> Path:
    """The demo catalogue plus the empty-shelf entry and a compliance operating point, next to it."""
    path = out / f"{catalog_path.stem}-shelf.safetensors"
    subprocess.run([sys.executable, "-m", "consumer.cli", "catalog", "calibrate-compliance", "--catalog",
                    str(catalog_path), "--photos", str(photos_dir), "--frames", str(CALIBRATION_FRAMES),
                    "--out", str(path)], check=True)
    return path


def frames(photos_dir: Path) -> list[ShelfFrame]:
    """Composed bays from the demo's store photos (the whole pool: there is no held-out split here)."""
    pool: dict[str, list[Path]] = {}
    for p in sorted(photos_dir.glob("*/*.jpg")):
        pool.setdefault(p.parent.name, []).append(p)
    return [compose_frame(pool, seed=700 + i, camera_id=f"store-12-bay-{i + 1:02d}", version="2026-12-01")
            for i in range(FRAMES)]


async def create_topics(bootstrap: str, topics: dict[str, str]) -> None:
    """The planogram topic compacted, as `shelfmatch topics create` makes it; the others plain."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(name, 1, 1, topic_configs={"cleanup.policy": "compact"} if role == "planograms" else {})
            for role, name in topics.items()])
    finally:
        await admin.close()


async def publish(bootstrap: str, planogram_topic: str, input_topic: str | None, shelf: list[ShelfFrame]) -> None:
    """Planograms to their topic, or (with ``input_topic``) the frames."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        for f in shelf:
            camera = f.planogram.camera_id.encode()
            if input_topic is None:
                await producer.send_and_wait(planogram_topic, f.planogram.model_dump_json().encode(), key=camera)
            else:
                buf = io.BytesIO()
                f.image.save(buf, "JPEG", quality=90)
                await producer.send_and_wait(input_topic, buf.getvalue(), key=camera,
                                             headers=[("camera-id", camera), ("content-type", b"image/jpeg")])
    finally:
        await producer.stop()


async def read(bootstrap: str, output: str, expected: int) -> list[dict]:
    consumer = AIOKafkaConsumer(output, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    events: list[dict] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(events) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(events)} compliance events after {TIMEOUT_S}s")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events.extend(json.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return events


def verdicts_of(event: dict) -> list[FacingVerdict]:
    return [FacingVerdict(
        slot_id=f["slot"], expected=f["expected_sku"], status=FacingStatus(f["status"]),
        candidates=tuple((c["sku"], c["score"]) for c in f["candidates"]), expected_score=f["expected_score"],
        margin=f["margin"], empty_score=f["empty_score"],
    ) for f in event["facings"]]


def report(shelf: list[ShelfFrame], events: list[dict], out: Path) -> None:
    by_camera = {e["photo"]["camera_id"]: e for e in events}
    agree = total = 0
    for f in shelf:
        event = by_camera[f.planogram.camera_id]
        s = event["summary"]
        print(f"\n{f.planogram.camera_id} (planogram {event['planogram']['version']}): "
              f"{s['counts']}, compliance {s['compliance']}")
        print(f"  {'slot':<7} {'expected':<26} {'best candidate':<26} {'score':>6}  {'status':<14} truth")
        for facing, truth in zip(event["facings"], f.truth, strict=True):
            total += 1
            agree += facing["status"] == truth.status.value
            mark = "" if facing["status"] == truth.status.value else "  <- differs"
            print(f"  {facing['slot']:<7} {facing['expected_sku']:<26} {facing['best']['sku']:<26} "
                  f"{facing['best']['score']:6.3f}  {facing['status']:<14} {truth.status.value}{mark}")
        png = out / f"compliance-{f.planogram.camera_id}.png"
        render_compliance(f.image, f.planogram, verdicts_of(event)).save(png)
        print(f"  picture: {png}")
    print(f"\nstatus as composed: {agree}/{total} facings (operating point calibrated on {CALIBRATION_FRAMES} other "
          "frames of the same photos: docs/quality.md measures it on frames of unseen photos)")
    (out / "sample-compliance-event.json").write_text(json.dumps(events[0], indent=2) + "\n")


def run(bootstrap: str, catalog_path: Path, out: Path, photos_dir: Path, run_id: str,
        start_service: Callable[[dict[str, str]], Callable[[], int]]) -> int:
    """The whole compliance demo; ``start_service(env)`` starts `shelfmatch consume` (ready) and
    returns the function that stops it and gives its exit code."""
    catalog = shelf_catalog(catalog_path, photos_dir, out)
    shelf = frames(photos_dir)
    topics = {name: f"shelf.{name}.demo-{run_id}" for name in ("planograms", "frames", "compliance", "frames.dlq")}
    asyncio.run(create_topics(bootstrap, topics))
    asyncio.run(publish(bootstrap, topics["planograms"], None, shelf))
    stop = start_service({
        "SHELFMATCH_CATALOG": str(catalog), "SHELFMATCH_PLANOGRAM_TOPIC": topics["planograms"],
        "SHELFMATCH_INPUT_TOPIC": topics["frames"], "SHELFMATCH_OUTPUT_TOPIC": topics["compliance"],
        "SHELFMATCH_DLQ_TOPIC": topics["frames.dlq"], "SHELFMATCH_GROUP_ID": f"shelfmatch-compliance-{run_id}",
    })
    asyncio.run(publish(bootstrap, topics["planograms"], topics["frames"], shelf))
    events = asyncio.run(read(bootstrap, topics["compliance"], len(shelf)))
    report(shelf, events, out)
    return stop()
