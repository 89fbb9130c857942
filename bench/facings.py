"""Facings per second through the service's stages against the model alone, in one run.

    .venv/bin/python bench/facings.py [--model efficientnet_lite0] [--batch 32] [--frames 24]
                                      [--facings 32] [--device cpu|cuda] [--repeat 2]

- model alone: the embedder and matcher on facings already cut to the model's size (uint8,
  on the device), ``--batch`` at a time: the most facings/s the hardware gives at that batch size;
- service: shelf frames (composed from the demo photos, ``--facings`` per frame on 4 rows) fed
  as Kafka records from memory through the service's own stages: header checks and frame
  decode in the decode pool, photo batching, the facing cut (on the model's device, in the model
  stage), facing batching, embedding, compliance verdicts against the planogram, and the
  ComplianceEvent JSON of every frame. No broker (bench/e2e.py measures Kafka's share).

The target (issue #14) is service >= 90% of the model alone. The two sides run alternated
``--repeat`` times; printed are the ratio of the best of each side and the median of the ratios
of each alternated pair (robust to one side's lucky or unlucky run on a shared machine), and each
run's core-ms per facing (this process's CPU time over its facings: what the service spends per
facing around the network is the difference).
Weights are ``none`` (seeded random): speed does not depend on them. Results go to
out/bench/facings.json.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from aiokafka.structs import ConsumerRecord
from PIL import Image
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "out" / "bench"

from catalog.build import build_catalog, references_from_folder  # noqa: E402
from catalog.embedder import Embedder, resolve_device  # noqa: E402
from catalog.matcher import Matcher  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.planogram import parse_planogram  # noqa: E402
from catalog.preprocess import DecodeLimits, decode_frame  # noqa: E402
from consumer.batcher import batches  # noqa: E402
from consumer.facings import Facing, Frames, crop  # noqa: E402
from consumer.metrics import Metrics  # noqa: E402
from consumer.pipeline import Recognizer, Topics, finish_decoding, process  # noqa: E402
from consumer.settings import available_cpus  # noqa: E402
from consumer.source import Received, decode_record  # noqa: E402
from consumer.stream import END, QUEUE_DEPTHS, EndOfStream  # noqa: E402

ROWS = 4
FACING_PX = 200


def shelf_frames(n: int, facings: int) -> tuple[list[bytes], list[str]]:
    """``n`` JPEG frames of ``facings`` demo photos on 4 rows, and the SKUs they show."""
    photos = sorted((ROOT / "data" / "grocery-demo" / "photos").glob("*/*.jpg"))
    per_row = facings // ROWS
    frames, skus = [], sorted({p.parent.name for p in photos})
    for i in range(n):
        img = Image.new("RGB", (per_row * FACING_PX, ROWS * FACING_PX), (240, 240, 235))
        for j in range(facings):
            with Image.open(photos[(i * facings + j) % len(photos)]) as tile:
                img.paste(tile.convert("RGB").resize((FACING_PX, FACING_PX)),
                          ((j % per_row) * FACING_PX, (j // per_row) * FACING_PX))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames, skus


def planogram(skus: list[str], facings: int) -> dict:
    per_row = facings // ROWS
    return {"camera_id": "bench", "version": "v1", "slots": [
        {"id": f"s{j}", "sku": skus[j % len(skus)], "row": j // per_row, "position": j % per_row, "region": {
            "x0": (j % per_row) / per_row, "y0": (j // per_row) / ROWS,
            "x1": (j % per_row + 1) / per_row, "y1": (j // per_row + 1) / ROWS}} for j in range(facings)]}


def cut_facings(recognizer: Recognizer, frames: list[bytes], plan: dict, batch: int) -> torch.Tensor:
    """``batch`` facings of the frames, cut as the service cuts them (the same pixels: a CNN with
    random weights is not equally fast on noise and on photos, denormal floats differ)."""
    planogram = parse_planogram(json.dumps(plan))
    facings = [Facing(region=s.region) for s in planogram.slots]
    device = recognizer.embedder.device
    crops = [crop(decode_frame(f, 1600).pixels, facings, recognizer.embedder.input_size, device)
             for f in frames[: -(-batch // len(facings))]]
    return torch.cat(crops)[:batch]


def model_alone(recognizer: Recognizer, x: torch.Tensor, seconds: float) -> float:
    """Facings/s of embed + match on facings already cut (as the service's model thread gets them)."""
    batch = len(x)
    recognizer.matcher.match(recognizer.embedder.embed(x))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        vectors = recognizer.embedder.embed(x)
        recognizer.matcher.scores(vectors).cpu()
        n += batch
    return n / (time.perf_counter() - start)


async def service(recognizer: Recognizer, frames: list[bytes], plan: dict, batch: int, workers: int) -> float:
    """Facings/s through the service's stages, records fed from memory."""
    loop = asyncio.get_running_loop()
    limits = DecodeLimits()
    size = recognizer.embedder.input_size
    table = {"bench": parse_planogram(json.dumps(plan))}
    frames_opt = Frames(lambda: table)
    metrics = Metrics(CollectorRegistry())
    photo_batch = max(1, batch // len(plan["slots"]))  # photos per input batch: about one model batch of facings
    fetched: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_DEPTHS.fetched(photo_batch))
    batched: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_DEPTHS.batched)
    ready: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_DEPTHS.ready)
    processed: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_DEPTHS.processed)
    decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def feed() -> None:
        for i, value in enumerate(frames):
            rec = ConsumerRecord("bench", 0, i, int(time.time() * 1000), 0, b"bench", value, None, 5, len(value),
                                 [("camera-id", b"bench")])
            future = loop.run_in_executor(decode_pool, decode_record, rec, size, limits, False, frames_opt)
            await fetched.put(Received(record=rec, arrived=time.monotonic(), decoded=future))
        await fetched.put(END)

    async def drain() -> int:
        n = 0
        while not isinstance(outcome := await processed.get(), EndOfStream):
            n += sum(json.loads(r.value)["summary"]["facings"] for r in outcome.records if r.verdict)
        return n

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        tg.create_task(batches(fetched, batched, max_size=photo_batch, max_wait_s=0.05))
        tg.create_task(finish_decoding(batched, ready, recognizer=recognizer, device_pool=decode_pool, limits=limits,
                                       metrics=metrics))
        tg.create_task(process(ready, processed, recognizer=recognizer, model_pool=model_pool,
                               topics=Topics("out", "dlq"), metrics=metrics, max_dead_letter_bytes=limits.max_bytes,
                               batch_size=batch, batch_max_wait_s=0.05))
        facings = tg.create_task(drain())
    seconds = time.perf_counter() - start
    decode_pool.shutdown()
    model_pool.shutdown()
    assert facings.result() == len(frames) * len(plan["slots"]), facings.result()
    return facings.result() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--facings", type=int, default=32, help="facings per frame (a multiple of 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side, alternated; the best is kept")
    args = parser.parse_args()
    device = resolve_device(args.device)
    workers = available_cpus()
    if device.type == "cpu":
        torch.set_num_threads(workers)
    # What the service runs: auto precision and execution (OpenVINO on a CPU, a CUDA graph on a GPU).
    embedder = Embedder(load_backbone(args.model, weights="none"), device, precision="auto", execution="auto",
                        batch_size=args.batch, cache_dir=ROOT / ".cache" / "networks")
    print(f"embedder: {embedder.describe()}", flush=True)
    frames, skus = shelf_frames(args.frames, args.facings)
    catalog = build_catalog(references_from_folder(ROOT / "data" / "grocery-demo" / "references"), model=args.model,
                            weights="none", device=str(device), progress=False)
    recognizer = Recognizer(embedder, Matcher(catalog, device=device, threshold=0.5), catalog)
    recognizer.warm_up()
    plan = planogram(skus, args.facings)
    x = cut_facings(recognizer, frames, plan, args.batch)
    seconds = args.frames * args.facings / max(1.0, model_alone(recognizer, x, 1.0))
    alone, through = [], []
    cpu_alone, cpu_through = [], []  # core-ms per facing: the process's CPU time over the facings
    for _ in range(args.repeat):  # alternated, so that a load change on a shared machine hits both sides
        wall, cpu = time.perf_counter(), time.process_time()
        alone.append(model_alone(recognizer, x, seconds))
        cpu_alone.append((time.process_time() - cpu) * 1e3 / (alone[-1] * (time.perf_counter() - wall)))
        cpu = time.process_time()
        through.append(asyncio.run(service(recognizer, frames, plan, args.batch, workers)))
        cpu_through.append((time.process_time() - cpu) * 1e3 / (args.frames * args.facings))
    best_alone, best_service = max(alone), max(through)
    result = {
        "model": args.model, "device": str(device), "batch": args.batch, "frames": args.frames,
        "facings_per_frame": args.facings, "products": len(catalog.skus), "cpus": workers,
        "host": platform.node(), "load_avg_1m": os.getloadavg()[0],
        "model_alone_facings_s": alone, "service_facings_s": through, "ratio": best_service / best_alone,
        "paired_ratio_median": statistics.median(s / a for a, s in zip(alone, through, strict=True)),
        "core_ms_per_facing_model_alone": cpu_alone, "core_ms_per_facing_service": cpu_through,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "facings.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} on {device}, batch {args.batch}, {args.facings} facings per frame, {args.frames} frames, "
          f"{workers} CPUs, load {result['load_avg_1m']:.1f}")
    print(f"{'run':<24}{'facings/s':>12}{'core-ms/facing':>16}")
    for i, (a, s) in enumerate(zip(alone, through, strict=True)):
        print(f"{'model alone #' + str(i + 1):<24}{a:>12.1f}{cpu_alone[i]:>16.2f}")
        print(f"{'service stages #' + str(i + 1):<24}{s:>12.1f}{cpu_through[i]:>16.2f}")
    print(f"{'best ratio service/model':<24}{result['ratio']:>12.2f}   (target >= 0.90)")
    print(f"{'median of paired ratios':<24}{result['paired_ratio_median']:>12.2f}")


if __name__ == "__main__":
    main()
