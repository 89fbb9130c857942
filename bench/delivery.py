"""Throughput cost of exactly-once against at-least-once, measured in the same run.

The same backlog (demo store photos) is drained by `shelfmatch consume` once per delivery mode,
with MobileNetV3-Small (a light model, so that Kafka-side costs show rather than hide behind
the CNN). Writes out/bench/delivery.json; bench/report.py adds it to docs/performance.md.

    .venv/bin/python bench/delivery.py [--photos 1500]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import OUT, collect, create, rate_of, send, store_photos, watch  # noqa: E402
from bench.e2e import Service as _Service  # noqa: E402
from catalog.build import build_catalog, references_from_folder  # noqa: E402


class Service(_Service):
    def __init__(self, *args, delivery: str) -> None:
        os.environ["SHELFMATCH_DELIVERY"] = delivery
        try:
            super().__init__(*args)
        finally:
            del os.environ["SHELFMATCH_DELIVERY"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=1500)
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    catalog = OUT / "catalog-mobilenet_v3_small.safetensors"
    build_catalog(references_from_folder(ROOT / "data" / "grocery-demo" / "references"), model="mobilenet_v3_small",
                  weights="none", device="cpu", progress=False).save(catalog)
    env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(ROOT / ".cache" / "kafka" / "bench-delivery.json")}
    bootstrap = os.environ.get("SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS")
    started = not bootstrap
    if started:
        bootstrap = subprocess.run([str(ROOT / "scripts" / "kafka-local"), "start"], env=env, check=True,
                                   stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    photos = store_photos()
    results = {}
    try:
        for delivery in ("at-least-once", "exactly-once"):
            run = f"{delivery}-{os.urandom(3).hex()}"
            topic, out = f"bench.in.{run}", f"bench.out.{run}"
            asyncio.run(create(bootstrap, topic, out, out + ".dlq"))
            asyncio.run(send(bootstrap, topic, photos, a.photos))
            service = Service(bootstrap, catalog, topic, out, f"g-{run}", delivery=delivery)

            async def drain(service: Service = service, out: str = out) -> list:
                return await watch(service, asyncio.create_task(collect(bootstrap, out, a.photos)))

            results[delivery] = rate_of(asyncio.run(drain()))
            service.stop()
            print(f"{delivery}: {results[delivery]:.1f} photos/s", flush=True)
    finally:
        if started:
            subprocess.run([str(ROOT / "scripts" / "kafka-local"), "stop"], env=env, check=False)
    summary = {"photos": a.photos, "model": "mobilenet_v3_small", "batch_size": 32, "date": time.strftime("%Y-%m-%d"),
               "photos_s": results, "exactly_once_vs_at_least_once": results["exactly-once"] / results["at-least-once"]}
    (OUT / "delivery.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
