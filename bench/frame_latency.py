"""Latency per shelf frame through the real service and broker, at half of its own capacity.

    .venv/bin/python bench/frame_latency.py [--model efficientnet_lite0] [--facings 24] [--frames 240]
                                            [--load 0.5] [--load-seconds 20]

`shelfmatch consume` (a child process, the default execution of this machine) reads shelf frames
composed from the demo photos (bench/facings.py's frames: ``--facings`` per frame on 4 rows) from a
topic on the local broker, cuts them by a planogram file and publishes one ComplianceEvent per
frame. First a backlog of ``--frames`` is drained: the service's capacity in frames/s, and the
model's time per batch from its own metrics (embed + match). Then frames are offered at ``--load``
of that capacity for ``--load-seconds`` and each frame's latency is read off its event (input
record timestamp to the event's record timestamp).

Issue #14's bound: p99 per frame within max wait + 3 x batch time x batches per frame, with
batches per frame = facings / batch size, rounded up. The producer and the broker run on the
same cores as the service. Results go to out/bench/frame_latency.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import BATCH, OUT, Service, collect, create, rate_of, send, watch  # noqa: E402
from bench.facings import planogram, shelf_frames  # noqa: E402
from catalog.build import build_catalog, references_from_folder  # noqa: E402
from tests.kafka import Broker  # noqa: E402

MAX_WAIT_MS = 50  # the service's default SHELFMATCH_BATCH_MAX_WAIT_MS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--facings", type=int, default=24, help="facings per frame (a multiple of 4)")
    parser.add_argument("--frames", type=int, default=240, help="backlog drained to measure capacity")
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    args = parser.parse_args()

    frames, skus = shelf_frames(24, args.facings)
    with Image.open(io.BytesIO(frames[0])) as first:
        frame_pixels = first.width * first.height
    catalog = OUT / f"catalog-{args.model}.safetensors"
    if not catalog.exists():
        build_catalog(references_from_folder(ROOT / "data" / "grocery-demo" / "references"), model=args.model,
                      weights="none", device="cpu", progress=False).save(catalog)
    run = f"frames-{os.urandom(3).hex()}"
    plans = OUT / f"{run}-planograms.json"
    plans.parent.mkdir(parents=True, exist_ok=True)
    plans.write_text(json.dumps([planogram(skus, args.facings)]))
    headers = [("camera-id", b"bench")]
    broker = Broker.start()
    try:
        topic, out = f"bench.in.{run}", f"bench.out.{run}"
        asyncio.run(create(broker.bootstrap, topic, out, out + ".dlq"))
        asyncio.run(send(broker.bootstrap, topic, frames, args.frames, headers=headers))
        service = Service(broker.bootstrap, catalog, topic, out, f"g-{run}", "auto", "auto",
                          SHELFMATCH_PLANOGRAMS=str(plans))
        try:
            async def drain() -> list:
                return await watch(service, asyncio.create_task(collect(broker.bootstrap, out, args.frames)))

            backlog = asyncio.run(drain())  # peak RSS sampled meanwhile: the backlog fills every queue
            events = [json.loads(r.value) for r in backlog]
            assert all(e["schema_version"] == 2 and len(e["facings"]) == args.facings for e in events), \
                "frames were not matched facing by facing"
            capacity = rate_of(backlog)
            batch_s = service.batch_service_s()
            rate = args.load * capacity
            n = max(8, int(rate * args.load_seconds))

            async def phase() -> list:
                consume = asyncio.create_task(collect(broker.bootstrap, out, args.frames + n))
                await send(broker.bootstrap, topic, frames, n, rate=rate, headers=headers)
                return await consume

            records = asyncio.run(phase())[args.frames:]
            peak_rss_mb = service.peak_rss / 1e6
        finally:
            service.stop()
    finally:
        broker.stop()
        plans.unlink(missing_ok=True)
    latency = np.array([r.timestamp - json.loads(r.value)["source"]["timestamp_ms"] for r in records], dtype=float)
    per_frame = math.ceil(args.facings / BATCH)
    bound_ms = MAX_WAIT_MS + 3 * batch_s * 1e3 * per_frame
    result = {
        "model": args.model, "facings_per_frame": args.facings, "batch_size": BATCH,
        "cpus": len(os.sched_getaffinity(0)),
        "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
        "capacity_frames_s": capacity, "capacity_facings_s": capacity * args.facings, "batch_s": batch_s,
        "load": args.load, "offered_frames_s": rate, "frames": len(latency),
        "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95)),
        "p99_ms": float(np.percentile(latency, 99)), "bound_ms": bound_ms, "load_avg_1m": os.getloadavg()[0],
        "frame_pixels": frame_pixels, "backlog_peak_rss_mb": peak_rss_mb,
    }
    (OUT / "frame_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model}, {args.facings} facings per frame, batch {BATCH}, {result['cpus']} CPUs, {result['date']}")
    print("| capacity frames/s (facings/s) | batch time ms | load | offered frames/s | frames | p50 ms | p95 ms | "
          "p99 ms | bound ms (wait + 3 x batch x batches per frame) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {capacity:.1f} ({capacity * args.facings:.0f}) | {batch_s * 1e3:.0f} | {args.load:.0%} | {rate:.1f} | "
          f"{len(latency)} | {result['p50_ms']:.0f} | {result['p95_ms']:.0f} | {result['p99_ms']:.0f} | "
          f"{bound_ms:.0f}: {'met' if result['p99_ms'] <= bound_ms else 'missed'} |")
    print(f"peak RSS while draining the backlog of {args.frames} frames of {frame_pixels / 1e6:.2f} Mpx: "
          f"{peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
