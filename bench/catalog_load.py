"""What loading a large catalogue costs the threads beside it, in one process, without a broker.

    .venv/bin/python bench/catalog_load.py [--rows 50000]

A synthetic catalogue (random unit vectors in EfficientNet-Lite0's space) is saved, then:

1. **GIL**: a thread ticks every 0.2 ms while another runs ``Catalog.load``; the longest gap
   between ticks is how long the loader held the GIL (the event loop and the model thread of a
   service wait that long).
2. **Contention**: OpenVINO batches of 8 (the service's default CPU execution) are timed alone,
   then beside a thread loading the catalogue without pause, at nice 10, nice 19 and SCHED_IDLE
   (the catalogue thread's policy in consumer/app.py).
3. **Saturation**: one load at each policy while batches of 32 run back to back (a backlog), to
   show whether the load is starved.

docs/performance.md (Catalogue changes) quotes the table it prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.catalog_swap import synthetic  # noqa: E402
from catalog.embedder import Embedder  # noqa: E402
from catalog.matcher import Matcher  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.store import Catalog  # noqa: E402

POLICIES: dict[str, Callable[[int], None]] = {
    "nice 10": lambda tid: os.setpriority(os.PRIO_PROCESS, tid, 10),
    "nice 19": lambda tid: os.setpriority(os.PRIO_PROCESS, tid, 19),
    "SCHED_IDLE": lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0)),
}


def longest_gil_hold(path: Path) -> float:
    """Milliseconds of the longest gap a 0.2 ms ticker saw while ``path`` was loaded."""
    loader = threading.Thread(target=lambda: Catalog.load(path))
    gaps, last = [], time.perf_counter()
    loader.start()
    while loader.is_alive():
        time.sleep(0.0002)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return max(gaps) * 1e3


def batch_times(embed: Callable[[], None], n: int) -> np.ndarray:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        embed()
        out.append(time.perf_counter() - start)
        time.sleep(0.03)  # a stream, not a backlog: the model thread waits between batches
    return np.array(out) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=150)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="catalog-load-")) / "c.safetensors"
    synthetic(args.rows, seed=1).save(path)
    catalog = Catalog.load(path)  # also warms the page cache
    embedder = Embedder(load_backbone("efficientnet_lite0", weights="none"), "cpu", execution="openvino",
                        precision="auto", batch_size=32, cache_dir=ROOT / ".cache" / "networks")
    matcher = Matcher(catalog, device=torch.device("cpu"))
    small = torch.randint(0, 255, (8, 3, 224, 224), dtype=torch.uint8)
    large = torch.randint(0, 255, (32, 3, 224, 224), dtype=torch.uint8)

    def embed_small() -> None:
        matcher.match(embedder.embed(small))

    for _ in range(5):
        embed_small()
    print(f"{args.rows:,} x {catalog.fingerprint.dim} catalogue, {len(os.sched_getaffinity(0))} CPUs, "
          f"{embedder.describe()}")
    print(f"longest GIL hold during Catalog.load: {np.median([longest_gil_hold(path) for _ in range(3)]):.1f} ms "
          "(median of 3)")

    print("\n| catalogue thread | batch of 8 p50 ms | p90 ms | load under a backlog s |")
    print("|---|---|---|---|")
    alone = batch_times(embed_small, args.batches)
    print(f"| none (batches alone) | {np.median(alone):.1f} | {np.percentile(alone, 90):.1f} | |")
    for name, apply in POLICIES.items():
        stop = threading.Event()

        def load_forever(apply: Callable[[int], None] = apply, stop: threading.Event = stop) -> None:
            apply(threading.get_native_id())
            while not stop.is_set():
                Matcher(Catalog.load(path), device=torch.device("cpu"))
                time.sleep(0.2)

        loader = threading.Thread(target=load_forever)
        loader.start()
        beside = batch_times(embed_small, args.batches)
        stop.set()
        loader.join()

        busy, took = threading.Event(), []

        def backlog(busy: threading.Event = busy) -> None:
            while not busy.is_set():
                matcher.match(embedder.embed(large))

        def one_load(apply: Callable[[int], None] = apply, took: list = took) -> None:
            apply(threading.get_native_id())
            start = time.perf_counter()
            Catalog.load(path)
            took.append(time.perf_counter() - start)

        model = threading.Thread(target=backlog)
        model.start()
        time.sleep(1.0)
        timed = threading.Thread(target=one_load)
        timed.start()
        timed.join(120)
        busy.set()
        model.join()
        print(f"| {name} | {np.median(beside):.1f} | {np.percentile(beside, 90):.1f} | "
              f"{took[0] if took else float('nan'):.2f} |")
    path.unlink()


if __name__ == "__main__":
    main()
