"""Row 17 of the reliability matrix: the catalogue file replaced under a steady stream (a corrupt
file, another model's file, the file removed, then an atomic rename and a symlink flip): nothing
lost, no restart, no rebalance, and every event names the catalogue its batch was matched with."""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import defaultdict

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from catalog.models import load_backbone
from catalog.store import Catalog
from catalog.update import remove
from tests.fault.conftest import Verdict, small_photo, verify
from tests.kafka import Sent, read_until

pytestmark = [pytest.mark.integration, pytest.mark.fault]

RATE = 40  # photos per second: steady, well below what the service drains with this catalogue


def swaps(text: str, result: str) -> float:
    found = re.search(rf'^shelfmatch_catalog_swaps_total{{result="{result}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def until_swaps(svc, result: str, count: int, timeout_s: float = 60.0) -> None:
    """Poll /metrics (the stream keeps flowing meanwhile) until ``count`` results of that kind."""
    deadline = time.monotonic() + timeout_s
    while swaps(svc.metrics(), result) < count:
        assert svc.proc.poll() is None, f"the service exited:\n{svc.log()}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} catalogue swaps with result {result} after {timeout_s}s:\n{svc.log()}")
        await asyncio.sleep(0.1)


async def until_sent(sent: list[Sent], count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(sent) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(sent)} of {count} photos sent after {timeout_s}s")
        await asyncio.sleep(0.05)


async def steady(bootstrap: str, topic: str, stop: asyncio.Event, sent: list[Sent]) -> None:
    """One photo every 1/RATE s until ``stop``; each acknowledged before the next is sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            meta = await (await producer.send(topic, small_photo(i)))
            sent.append(Sent(meta.topic, meta.partition, meta.offset, None, ()))
            i += 1
            next_at += 1 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        await producer.stop()


async def test_catalogue_replaced_under_a_stream_swaps_without_loss_and_bad_files_keep_the_old_one(
    broker, topics, service, fast_catalog, tmp_path, reliability_log
):
    path = tmp_path / "serving.safetensors"
    first = Catalog.load(fast_catalog)
    first.save(path)
    second = remove(first, skus=["sku-3"]).catalog  # what `shelfmatch catalog remove` writes
    third = remove(first, skus=["sku-0"]).catalog
    other_fp = load_backbone("resnet18", weights="none").fingerprint
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, other_fp.dim)).astype(np.float32)
    other_model = Catalog(embeddings=rows / np.linalg.norm(rows, axis=1, keepdims=True),
                          row_sku=np.arange(4, dtype=np.int32), skus=first.skus, fingerprint=other_fp)

    svc = service(SHELFMATCH_CATALOG=str(path), SHELFMATCH_CATALOG_POLL_S="0.2", SHELFMATCH_BATCH_MAX_WAIT_MS="20")
    svc.wait_ready()
    pid = svc.proc.pid
    start = time.monotonic()
    stop, sent = asyncio.Event(), []
    producing = asyncio.create_task(steady(broker.bootstrap, topics.input, stop, sent))

    def ship(write) -> None:
        """Under another name, then renamed over the serving path, as the runbook says."""
        tmp = tmp_path / "incoming.tmp"
        write(tmp)
        os.replace(tmp, path)

    try:
        await until_sent(sent, 2 * RATE)  # the stream is flowing on the first catalogue
        ship(lambda p: p.write_bytes(b"\x00\x01not a catalogue" * 100))
        await until_swaps(svc, "invalid", 1)
        ship(other_model.save)
        await until_swaps(svc, "other_model", 1)
        path.unlink()
        await until_swaps(svc, "missing", 1)
        ship(second.save)  # a valid new version: swapped in
        await until_swaps(svc, "swapped", 1)
        target = tmp_path / "v3.safetensors"
        third.save(target)
        link = tmp_path / "link.tmp"
        link.symlink_to(target)
        os.replace(link, path)  # a symlink flipped, as a ConfigMap or volume update lands
        await until_swaps(svc, "swapped", 2)
        await until_sent(sent, len(sent) + 2 * RATE)  # the stream runs on the newest catalogue for a while
    finally:
        stop.set()
        await producing

    records = await read_until(broker.bootstrap, topics.output,
                               lambda rs: len({json.loads(r.value)["event_id"] for r in rs}) >= len(sent))
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent)
    order = {first.version: 0, second.version: 1, third.version: 2}
    per_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in records:
        event = json.loads(r.value)
        version = event["catalog"]["version"]
        assert version in order, f"event names catalogue {version}, never served"
        skus = {c["sku"] for c in event["candidates"]}
        assert not (version == second.version and "sku-3" in skus)  # matched against that catalogue
        assert not (version == third.version and "sku-0" in skus)
        per_partition[event["source"]["partition"]].append((event["source"]["offset"], order[version]))
    for partition, seen in per_partition.items():
        versions = [v for _, v in sorted(seen)]
        assert versions == sorted(versions), f"partition {partition}: a batch matched an older catalogue later"
    served = {v for seen in per_partition.values() for _, v in seen}
    assert served == {0, 1, 2}, "each catalogue served part of the stream"
    assert lost == 0 and duplicated == 0
    assert svc.proc.poll() is None and svc.proc.pid == pid  # no restart
    assert svc.log().count("assigned [") == 1  # no rebalance
    text = svc.metrics()
    assert f'shelfmatch_catalog_info{{model="mobilenet_v3_small",version="{third.version}"}} 1.0' in text
    assert first.version not in text.split("shelfmatch_catalog_info", 1)[1].split("# HELP", 1)[0]
    reliability_log.append(Verdict(
        "catalogue replaced under a stream (corrupt, other model, removed, rename, symlink flip)", len(sent), lost,
        duplicated, round(time.monotonic() - start, 1),
        notes={"swaps": {r: swaps(text, r) for r in ("swapped", "invalid", "other_model", "missing")},
               "events_per_catalogue": [sum(v == i for seen in per_partition.values() for _, v in seen)
                                        for i in range(3)]},
    ))
