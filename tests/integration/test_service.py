"""The service end to end against the real Apache Kafka broker."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from catalog.build import build_catalog, references_from_folder
from consumer.messages import MatchEvent
from consumer.stream import QUEUE_DEPTHS
from tests import photos as P
from tests.kafka import committed, end_offsets, produce, read_all, read_until, unique

pytestmark = pytest.mark.integration


def demo_stream():
    """The 50 demo store photos with a camera key and the contract's headers."""
    items = P.store_photos()
    values = [path.read_bytes() for path, _ in items]
    keys = [f"cam-{i % 7}".encode() for i in range(len(items))]
    headers = [
        [("store-id", b"store-12"), ("shelf-id", f"bay-{i % 4}".encode()),
         ("captured-at", b"2026-11-27T08:15:00.250+01:00"), ("content-type", b"image/jpeg")]
        for i in range(len(items))
    ]
    return values, keys, headers, [sku for _, sku in items]


def distinct_ids(n):
    return lambda records: len({json.loads(r.value)["event_id"] for r in records}) >= n


def metric(text: str, name: str, **labels: str) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + label + '}') if label else ''} (\S+)$"
    found = re.search(pattern, text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


async def test_one_event_per_photo_with_ids_keys_headers_and_filled_metrics(broker, topics, service, grocery_catalog):
    values, keys, headers, truth = demo_stream()
    sent = await produce(broker.bootstrap, topics.input, values, keys=keys, headers=headers)
    svc = service()
    svc.wait_ready()

    records = await read_until(broker.bootstrap, topics.output, distinct_ids(len(sent)))
    events = {}
    for r in records:
        event = MatchEvent.model_validate_json(r.value)  # every event follows the published schema
        events[event.event_id] = (r, event)
    assert set(events) == {s.event_id for s in sent}
    assert len(records) == len(sent)  # no duplicates in a clean run

    correct = 0
    for s, want in zip(sent, truth, strict=True):
        record, event = events[s.event_id]
        assert record.key == s.key  # keyed like the input, so per-camera order is kept downstream
        assert (event.source.topic, event.source.partition, event.source.offset) == (s.topic, s.partition, s.offset)
        assert event.photo.camera_id == s.key.decode() and event.photo.store_id == "store-12"
        assert event.photo.shelf_id == dict(s.headers)["shelf-id"].decode()
        assert event.photo.captured_at == datetime(2026, 11, 27, 7, 15, 0, 250000, tzinfo=UTC)
        assert (event.photo.width, event.photo.height) == (348, 348)
        assert event.catalog.version == grocery_catalog[0].version
        assert event.threshold == 0.7 and len(event.candidates) == 5
        assert event.best == event.candidates[0]
        assert (event.verdict == "unknown") == (event.best.score < 0.7)
        correct += event.best.sku == want
    assert correct / len(sent) >= 0.8  # 10 products, ImageNet features: 43/50 when measured

    text = svc.metrics()
    assert metric(text, "shelfmatch_end_to_end_latency_seconds_count") == len(sent)
    assert metric(text, "shelfmatch_photos_total", outcome="matched") == len(sent)
    for stage in ("decode", "batch_wait"):
        assert metric(text, "shelfmatch_stage_latency_seconds_count", stage=stage) == len(sent)
    for stage in ("embed", "match", "publish", "commit"):
        assert metric(text, "shelfmatch_stage_latency_seconds_count", stage=stage) >= len(sent) / 8
    assert metric(text, "shelfmatch_batch_size_sum") == len(sent)
    assert metric(text, "shelfmatch_catalog_products") == 10
    assert "shelfmatch_consumer_lag_records{" in text


@pytest.mark.parametrize("jpeg_decoder", ["pillow", "device"])
async def test_poison_goes_to_the_dead_letter_topic_while_valid_photos_flow(broker, topics, service, jpeg_decoder):
    """Every poison class of the reliability matrix, interleaved with valid photos and valid oddities.

    With the batched device decoder (nvJPEG on a GPU; torchvision's libjpeg here) plain JPEGs take
    the batch path and every verdict must stay the same."""
    import psutil

    shelf = P.photo(P.store_photos()[0][0])
    poison = [
        ("empty", b"", []),
        ("unsupported-format", P.random_bytes(), []),
        ("corrupt-image", P.truncated_jpeg(shelf), []),
        ("corrupt-image", P.corrupt_body_jpeg(shelf), []),
        ("decompression-bomb", P.png_bomb(), []),
        ("decompression-bomb", P.png_bomb(9_000, 9_000), []),
        ("unsupported-format", P.tiff(shelf), []),
        ("unsupported-format", P.gif(shelf), []),
        ("unsupported-format", P.eps_header(), []),
        ("unsupported-format", P.svg(), []),
        ("too-large", P.oversized(600_000), []),
        ("bad-header", P.encode(shelf, "JPEG"), [("captured-at", b"last tuesday")]),
        ("bad-header", P.encode(shelf, "JPEG"), [("store-id", b"\xc3\x28")]),
    ]
    oddities = [P.grayscale(shelf), P.cmyk_jpeg(shelf), P.gray16_png(shelf), P.rgba_png(shelf, 128),
                P.palette_png(shelf), P.exif_rotated_jpeg(shelf), P.one_pixel(), P.webp(shelf)]
    good = [path.read_bytes() for path, _ in P.store_photos()[:10]]
    values, headers, expect = [], [], []
    for i, value in enumerate(good + oddities):
        values.append(value)
        headers.append([("camera-id", f"c{i}".encode())])
        expect.append(None)
        if i < len(poison):
            reason, bad, extra = poison[i]
            values.append(bad)
            headers.append([("camera-id", f"bad{i}".encode()), *extra])
            expect.append(reason)
    sent = await produce(broker.bootstrap, topics.input, values, headers=headers)
    svc = service(SHELFMATCH_MAX_MESSAGE_BYTES="600000", SHELFMATCH_JPEG_DECODER=jpeg_decoder)
    svc.wait_ready()
    rss_ready = psutil.Process(svc.proc.pid).memory_info().rss

    n_poison = sum(e is not None for e in expect)
    dead = await read_until(broker.bootstrap, topics.dlq, lambda rs: len(rs) >= n_poison)
    events = await read_until(broker.bootstrap, topics.output, distinct_ids(len(sent) - n_poison))
    rss_after = psutil.Process(svc.proc.pid).memory_info().rss
    by_source = {}
    for r in dead:
        h = dict(r.headers)
        by_source[(int(h["dlq-source-partition"]), int(h["dlq-source-offset"]))] = r
    for s, reason, value in zip(sent, expect, values, strict=True):
        if reason is None:
            continue
        r = by_source[(s.partition, s.offset)]
        h = dict(r.headers)
        assert h["dlq-reason"].decode() == reason
        assert h["dlq-error"] and h["dlq-source-topic"].decode() == topics.input
        assert list(r.headers)[: len(s.headers)] == list(s.headers)  # original headers first, unchanged
        if reason == "too-large":
            assert r.value == value[:600_000] and h["dlq-value-truncated-from"] == str(len(value)).encode()
        else:
            assert r.value == value
    event_ids = {json.loads(r.value)["event_id"] for r in events}
    assert event_ids == {s.event_id for s, e in zip(sent, expect, strict=True) if e is None}  # oddities matched too
    assert len(dead) == n_poison

    text = svc.metrics()
    for reason, count in Counter(e for e in expect if e).items():
        assert metric(text, "shelfmatch_dead_letters_total", reason=reason) == count
    assert svc.proc.poll() is None  # still running
    # Two bombs declaring 10 and 0.08 gigapixels were refused from their headers, never decoded.
    assert rss_after - rss_ready < 300e6


async def test_killed_consumer_resumes_from_committed_offsets_without_loss(broker, topics, service):
    values, keys, headers, _ = demo_stream()
    # 600 photos: enough that the kill after 40 events lands mid-stream even at OpenVINO's pace
    # (200 were all committed before the kill once the CPU path got 3x faster).
    values, keys, headers = values * 12, keys * 12, headers * 12
    sent = await produce(broker.bootstrap, topics.input, values, keys=keys, headers=headers)
    first = service(SHELFMATCH_BATCH_SIZE="4")
    first.wait_ready()
    await read_until(broker.bootstrap, topics.output, distinct_ids(40))
    first.kill()  # SIGKILL mid-stream: no drain, no final commit

    before = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
    assert sum(v or 0 for v in before.values()) < len(sent)  # really stopped mid-stream
    second = service(SHELFMATCH_BATCH_SIZE="4")
    second.wait_ready()
    records = await read_until(broker.bootstrap, topics.output, distinct_ids(len(sent)))
    ids = Counter(json.loads(r.value)["event_id"] for r in records)
    assert set(ids) == {s.event_id for s in sent}  # nothing lost
    dupes = sum(c - 1 for c in ids.values())
    assert dupes <= QUEUE_DEPTHS.photos_in_flight(4)  # only the uncommitted window repeats


async def test_sigterm_drains_publishes_commits_and_exits_zero(broker, topics, service):
    values, keys, headers, _ = demo_stream()
    sent = await produce(broker.bootstrap, topics.input, values * 2, keys=keys * 2, headers=headers * 2)
    svc = service()
    svc.wait_ready()
    await read_until(broker.bootstrap, topics.output, distinct_ids(8))
    start = time.monotonic()
    assert svc.terminate(timeout_s=60) == 0
    assert time.monotonic() - start < 30

    done = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
    records = await read_all(broker.bootstrap, topics.output)
    published = {json.loads(r.value)["event_id"] for r in records}
    # Every committed offset has its event: nothing was committed ahead of its publish.
    for s in sent:
        if done[s.partition] is not None and s.offset < done[s.partition]:
            assert s.event_id in published
    # And everything fetched before the signal was finished: the commit covers what was published.
    for eid in published:
        _, partition, offset = eid.rsplit("/", 2)
        assert int(offset) < (done[int(partition)] or 0)


async def test_after_a_clean_stop_the_committed_offsets_reach_the_end(broker, topics, service):
    values, keys, headers, _ = demo_stream()
    sent = await produce(broker.bootstrap, topics.input, values[:12], keys=keys[:12], headers=headers[:12])
    svc = service()
    svc.wait_ready()
    await read_until(broker.bootstrap, topics.output, distinct_ids(len(sent)))
    assert svc.terminate() == 0
    ends = await end_offsets(broker.bootstrap, topics.input, topics.partitions)
    assert await committed(broker.bootstrap, topics.group, topics.input, topics.partitions) == {
        p: (off if off else None) for p, off in ends.items()
    }


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
async def test_a_dead_letter_too_large_for_its_topic_goes_without_the_photo(broker, topics, service, delivery):
    """The input topic takes a 300 kB record that the dead-letter topic (max.message.bytes 100 kB)
    refuses: that dead letter is published without its value instead of stalling the partition."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    dlq = unique("dlq-small")
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(dlq, 1, 1, topic_configs={"max.message.bytes": "100000"})])
    finally:
        await admin.close()
    good = [path.read_bytes() for path, _ in P.store_photos()[:6]]
    big, small = P.random_bytes(300_000), P.random_bytes(2_000, seed=8)
    sent = await produce(broker.bootstrap, topics.input, good[:3] + [big, small] + good[3:],
                         headers=[[("camera-id", f"c{i}".encode())] for i in range(8)])
    svc = service(SHELFMATCH_DLQ_TOPIC=dlq, SHELFMATCH_DELIVERY=delivery)
    svc.wait_ready()
    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    dead = await read_until(broker.bootstrap, dlq, lambda rs: len(rs) >= 2, isolation_level=isolation)
    events = await read_until(broker.bootstrap, topics.output, distinct_ids(6), isolation_level=isolation)

    by_source = {(int(dict(r.headers)["dlq-source-partition"]), int(dict(r.headers)["dlq-source-offset"])): r
                 for r in dead}
    big_letter, small_letter = (by_source[(sent[i].partition, sent[i].offset)] for i in (3, 4))
    assert big_letter.value == b"" and dict(big_letter.headers)["dlq-value-truncated-from"] == b"300000"
    assert dict(big_letter.headers)["dlq-reason"] == b"unsupported-format"
    assert dict(big_letter.headers)["camera-id"] == b"c3"
    assert small_letter.value == small and "dlq-value-truncated-from" not in dict(small_letter.headers)
    assert len(dead) == 2
    matched = {s.event_id for i, s in enumerate(sent) if i not in (3, 4)}
    assert {json.loads(r.value)["event_id"] for r in events} == matched
    assert svc.terminate() == 0
    ends = await end_offsets(broker.bootstrap, topics.input, topics.partitions)
    assert await committed(broker.bootstrap, topics.group, topics.input, topics.partitions) == {
        p: (off if off else None) for p, off in ends.items()
    }
    # Only the refused record was sent again: the batch's events were not republished.
    assert len(await read_all(broker.bootstrap, topics.output, isolation_level=isolation)) == 6


def test_a_catalogue_the_model_cannot_reproduce_is_refused(tmp_path, broker):
    import torch

    from catalog.models import load_backbone

    catalog = build_catalog(
        references_from_folder(P.REFERENCES), model="resnet18", weights="none", device="cpu", progress=False
    )
    path = tmp_path / "random.safetensors"
    catalog.save(path)
    other = tmp_path / "other.pth"
    torch.save({k: v * 0.5 for k, v in load_backbone("resnet18", weights="none").network.state_dict().items()}, other)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "consumer.cli",
            "consume",
            "--catalog",
            str(path),
            "--weights",
            str(other),
            "--kafka-bootstrap-servers",
            broker.bootstrap,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "was built with resnet18/none/512d" in result.stderr and "rebuild the catalogue" in result.stderr
