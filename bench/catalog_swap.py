"""A catalogue that changes while the stream runs: swap latency and `catalog add` against a rebuild.

Two measurements, in one run on one machine:

1. `catalog add`: a catalogue of the Grocery Store Dataset's packshots and train photos (MIT,
   ../shared/datasets/grocery-store) without one product, then that product's 10 images added to it
   (load, embed the new images only, save), against the full build of the same catalogue
   (ImageNet EfficientNet-Lite0, the CPU, both with 4 decode threads).
2. Swap under a steady stream: `shelfmatch consume` (the real service, a child process) on the local
   broker, fed the 50 demo store photos at a steady rate well below its capacity, first with no
   change to its catalogue, then while a new version of a large synthetic catalogue (random unit
   vectors in Lite0's space: the size matters here, not the content) replaces the file every few
   seconds. End-to-end latency (input record timestamp to the event's record timestamp) of the
   photos processed in each phase, side by side; every event's catalogue version is checked against
   the order of the swaps.

    .venv/bin/python bench/catalog_swap.py [--rows 100000] [--rate 6] [--phase-s 40]

Results go to out/bench/catalog_swap.json and a table on stdout, which docs/performance.md quotes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "out" / "bench"
DATASET = ROOT.parent / "shared" / "datasets" / "grocery-store"

from catalog.build import Reference, build_catalog  # noqa: E402
from catalog.grocery import grocery_sets  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.store import Catalog  # noqa: E402
from catalog.update import add_references, model_of, remove  # noqa: E402
from tests.kafka import Broker, create_topics, read_until, unique  # noqa: E402
from tests.service import Service  # noqa: E402

MODEL = "efficientnet_lite0"


def bench_add(dataset: Path, new_images: int = 10) -> dict:
    rows = grocery_sets(dataset)["packshots+train"]
    counts: dict[str, int] = defaultdict(int)
    for _, sku in rows:
        counts[sku] += 1
    new_sku = min((s for s, c in counts.items() if c >= new_images + 1), key=lambda s: (counts[s], s))
    base_refs = [Reference(p, s) for p, s in rows if s != new_sku]
    new_refs = [Reference(p, s) for p, s in rows if s == new_sku][:new_images]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.safetensors"
        began = time.perf_counter()
        base = build_catalog(base_refs, model=MODEL, device="cpu", progress=False)
        base.save(path)
        build_s = time.perf_counter() - began
        began = time.perf_counter()  # what `shelfmatch catalog add` does
        loaded = Catalog.load(path)
        change = add_references(loaded, new_refs, embedder=model_of(loaded, "cpu"), progress=False)
        change.catalog.save(path)
        add_s = time.perf_counter() - began
    return {"references": len(base_refs), "products": len(base.skus), "new_sku": new_sku,
            "new_images": len(new_refs), "build_s": round(build_s, 2), "add_s": round(add_s, 2),
            "rows_after": len(change.catalog.row_sku)}


def synthetic(rows: int, seed: int) -> Catalog:
    fp = load_backbone(MODEL, weights="imagenet").fingerprint
    vectors = np.random.default_rng(seed).standard_normal((rows, fp.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Catalog(embeddings=vectors, row_sku=np.arange(rows, dtype=np.int32),
                   skus=tuple(f"sku-{i:07d}" for i in range(rows)), fingerprint=fp, weights_source="imagenet")


async def produce_steadily(bootstrap: str, topic: str, photos: list[bytes], rate: float, until: float) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    sent, next_at = 0, time.monotonic()
    try:
        while time.monotonic() < until:
            await producer.send(topic, photos[sent % len(photos)])
            sent += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def bench_swap(rows: int, rate: float, phase_s: float, every_s: float) -> dict:
    photos = [f.read_bytes() for f in sorted((ROOT / "data" / "grocery-demo" / "photos").glob("*/*.jpg"))]
    work = Path(tempfile.mkdtemp(prefix="catalog-swap-"))
    path = work / "serving.safetensors"
    # Every version shipped is written beforehand (as an operator's file arrives whole), so that
    # the bench's own CPU is idle while the service swaps: one product fewer each time.
    files, order = [], {}
    catalog = synthetic(rows, seed=0)
    for i in range(int(phase_s / every_s) + 1):
        files.append(work / f"v{i}.safetensors")
        catalog.save(files[-1])
        order[catalog.version] = i
        catalog = remove(catalog, skus=[catalog.skus[-1]]).catalog
    dim = catalog.fingerprint.dim
    del catalog
    os.link(files[0], path)
    broker = Broker.start()
    try:
        topic, output, dlq = unique("photos"), unique("matches"), unique("dlq")
        await create_topics(broker.bootstrap, topic, partitions=3)
        await create_topics(broker.bootstrap, output, dlq, partitions=1)
        svc = Service({
            "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "SHELFMATCH_GROUP_ID": unique("group"),
            "SHELFMATCH_INPUT_TOPIC": topic, "SHELFMATCH_OUTPUT_TOPIC": output,
            "SHELFMATCH_DLQ_TOPIC": dlq, "SHELFMATCH_CATALOG": str(path),
            "SHELFMATCH_CATALOG_POLL_S": "0.5", "SHELFMATCH_BATCH_SIZE": "8",
            "SHELFMATCH_THRESHOLD": "0.7",  # synthetic catalogues: the verdicts do not matter here
        }, work / "service.log").start()
        try:
            svc.wait_ready(300)
            began = time.monotonic()
            steady_end = began + phase_s
            producing = asyncio.create_task(produce_steadily(broker.bootstrap, topic, photos, rate,
                                                             steady_end + phase_s))
            swaps: list[tuple[float, int]] = []  # (wall clock, version shipped)
            await asyncio.sleep(steady_end - time.monotonic())  # the steady phase: nothing changes
            swap_from = time.time()
            for n in range(1, len(files)):
                os.replace(files[n], path)
                swaps.append((time.time(), n))
                await asyncio.sleep(max(0.0, min(every_s, steady_end + phase_s - time.monotonic())))
            sent = await producing
            records = await read_until(broker.bootstrap, output,
                                       lambda rs: len({json.loads(r.value)["event_id"] for r in rs}) >= sent,
                                       timeout_s=300)
            metrics = svc.metrics()
            log = svc.log_path.read_text()
            restarted = svc.proc.poll() is not None
        finally:
            svc.close()
    finally:
        broker.stop()
    steady: list[float] = []
    swapping: list[float] = []
    per_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    ids = set()
    for r in records:
        event = json.loads(r.value)
        ids.add(event["event_id"])
        latency = (r.timestamp - event["source"]["timestamp_ms"]) / 1e3
        processed = r.timestamp / 1e3
        (swapping if processed >= swap_from else steady).append(latency)
        source = event["source"]
        per_partition[source["partition"]].append((source["offset"], order[event["catalog"]["version"]]))
    consistent = all([v for _, v in sorted(seen)] == sorted(v for _, v in seen) for seen in per_partition.values())
    swapped = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith('shelfmatch_catalog_swaps_total{result="swapped"}')))
    took = [next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))
            for name in ("shelfmatch_catalog_swap_seconds_sum", "shelfmatch_catalog_swap_seconds_count")]
    return {
        "rows": rows, "matrix_mb": round(rows * dim * 4 / 1e6), "rate": rate,
        "phase_s": phase_s, "swap_every_s": every_s, "sent": sent, "events": len(records),
        "lost": sent - len(ids), "duplicated": len(records) - len(ids), "files_shipped": len(swaps),
        "swapped": swapped, "mean_swap_s": round(took[0] / took[1], 2) if took and took[1] else None,
        "restarted": restarted, "assignments": log.count("consumer.pipeline: assigned ["),
        "versions_consistent": consistent,
        "steady": phase(steady), "swapping": phase(swapping),
    }


def phase(latencies: list[float]) -> dict:
    return {"photos": len(latencies), "p50_s": round(p(latencies, 50), 3), "p99_s": round(p(latencies, 99), 3),
            "worst_s": [round(v, 3) for v in sorted(latencies)[-5:]]}


def table(add: dict | None, swap: dict) -> str:
    ratio = swap["swapping"]["p99_s"] / swap["steady"]["p99_s"]
    lines = [
        f"Swap under a steady stream: {swap['rate']:g} photos/s, {swap['rows']:,} x 1280 catalogue "
        f"({swap['matrix_mb']} MB fp32), a new version every {swap['swap_every_s']:g} s",
        "",
        "| phase | photos | p50 s | p99 s | p99 / steady |",
        "|---|---|---|---|---|",
        f"| steady (no change) | {swap['steady']['photos']} | {swap['steady']['p50_s']:.3f} | "
        f"{swap['steady']['p99_s']:.3f} | 1.00 |",
        f"| during swaps ({int(swap['swapped'])} swapped) | {swap['swapping']['photos']} | "
        f"{swap['swapping']['p50_s']:.3f} | {swap['swapping']['p99_s']:.3f} | {ratio:.2f} |",
        "",
        f"sent {swap['sent']}, lost {swap['lost']}, duplicated {swap['duplicated']}, restarts "
        f"{int(swap['restarted'])}, partition assignments {swap['assignments']} (1 = no rebalance), "
        f"versions in swap order per partition: {swap['versions_consistent']}, mean time to swap "
        f"{swap['mean_swap_s']} s; slowest photos steady {swap['steady']['worst_s']}, during swaps "
        f"{swap['swapping']['worst_s']}",
    ]
    if add is None:
        return "\n".join(lines)
    lines += [
        "",
        "| catalogue change | references | seconds | vs full build |",
        "|---|---|---|---|",
        f"| full build | {add['references']:,} ({add['products']} products) | {add['build_s']:.1f} | 1.00 |",
        f"| `catalog add` of 1 SKU ({add['new_sku']}), {add['new_images']} images | {add['rows_after']:,} after | "
        f"{add['add_s']:.1f} | {add['add_s'] / add['build_s']:.3f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--phase-s", type=float, default=40.0)
    parser.add_argument("--swap-every-s", type=float, default=5.0)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--no-add", action="store_true", help="measure the swap only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    swap = asyncio.run(bench_swap(args.rows, args.rate, args.phase_s, args.swap_every_s))
    add = None if args.no_add else bench_add(args.dataset)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {"machine": f"{len(os.sched_getaffinity(0))} CPU cores ({platform.machine()}), torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "commit": commit.stdout.strip(), "swap": swap, "add": add}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "catalog_swap.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}, {result['date']}, commit {result['commit']}\n")
    print(table(add, swap))


if __name__ == "__main__":
    main()
