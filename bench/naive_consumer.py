"""The naive reference consumer the pipeline is measured against: one message at a time.

poll one record -> decode -> embed (batch of 1) -> match -> publish and wait for the ack ->
commit -> next. The same catalogue, model and event contents as the service, none of its
batching or overlap. Kept here (not in the product) only as the benchmark's baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from catalog.embedder import Embedder
from catalog.matcher import Matcher
from catalog.models import backbone_of
from catalog.preprocess import decode, to_tensor
from catalog.store import Catalog


async def run(bootstrap: str, input_topic: str, output_topic: str, group: str, catalog_path: str, count: int) -> None:
    catalog = Catalog.load(catalog_path)
    embedder = Embedder(backbone_of(catalog.fingerprint, catalog.weights_source, catalog.head()), "cpu")
    matcher = Matcher(catalog, device=torch.device("cpu"))
    consumer = AIOKafkaConsumer(input_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=16 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    try:
        for _ in range(count):
            record = await consumer.getone()
            image = decode(record.value, embedder.input_size).image
            match = matcher.match(embedder.embed(to_tensor(image).unsqueeze(0)))[0]
            event = {"event_id": f"{record.topic}/{record.partition}/{record.offset}", "best": match.best,
                     "verdict": match.verdict.value, "timestamp_ms": record.timestamp}
            await producer.send_and_wait(output_topic, json.dumps(event).encode(), key=record.key)
            await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("bootstrap", "input", "output", "group", "catalog"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args()
    start = time.monotonic()
    asyncio.run(run(a.bootstrap, a.input, a.output, a.group, a.catalog, a.count))
    print(json.dumps({"photos": a.count, "seconds": time.monotonic() - start}))


if __name__ == "__main__":
    main()
