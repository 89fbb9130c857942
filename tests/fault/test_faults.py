"""The fault matrix of ../shared/RELIABILITY.md against the real broker: lost must be 0 everywhere.

Every scenario is bounded in time by its deadlines; the figures of each run are recorded for
docs/reliability.md (scripts/reliability_report.py).
"""
from __future__ import annotations

import asyncio
import re
import time

import psutil
import pytest
from PIL import Image

from tests.fault.conftest import Verdict, small_photo, verify, wait_for
from tests.kafka import committed, create_topics, produce, read_until
from tests.photos import encode

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def events_seen(n: int):
    import json

    return lambda records: len({json.loads(r.value)["event_id"] for r in records}) >= n


def metric_value(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def stream(broker, topics, n: int, photo=small_photo):
    return await produce(broker.bootstrap, topics.input, [photo(i) for i in range(n)])


DELIVERY = pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])


def isolation(delivery: str) -> str:
    return "read_committed" if delivery == "exactly-once" else "read_uncommitted"


@DELIVERY
async def test_kill_9_three_times_during_10k_photos_loses_nothing(
    broker, topics, service, fast_catalog, reliability_log, delivery
):
    n = 10_000
    sent = await stream(broker, topics, n)
    settings = dict(SHELFMATCH_CATALOG=str(fast_catalog), SHELFMATCH_BATCH_SIZE="64", SHELFMATCH_DELIVERY=delivery)
    level = isolation(delivery)
    start = time.monotonic()
    kills = []
    for k in (1, 2, 3):
        svc = service(**settings)
        svc.wait_ready()
        await read_until(
            broker.bootstrap, topics.output, events_seen(int(n * 0.2 * k)), timeout_s=600, isolation_level=level
        )
        svc.kill()  # SIGKILL: no drain, no final commit
        done = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
        kills.append(sum(v or 0 for v in done.values()))
    last = service(**settings)
    last.wait_ready()
    recovered_from = time.monotonic()
    await read_until(broker.bootstrap, topics.output, events_seen(n), timeout_s=900, isolation_level=level)
    recovery = time.monotonic() - recovered_from
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent, level)
    reliability_log.append(
        Verdict(
            f"consumer kill -9 x3 (10k photos), {delivery}",
            n,
            lost,
            duplicated,
            round(time.monotonic() - start, 1),
            round(recovery, 1),
            {"committed_at_each_kill": kills},
        )
    )
    assert lost == 0
    assert kills == sorted(kills) and kills[-1] < n  # each kill really happened mid-stream
    if delivery == "exactly-once":
        assert duplicated == 0  # read_committed sees each photo once, whatever was in flight
    else:
        assert duplicated <= 3 * (2 * 64 + 4 * 64)  # at most the uncommitted window per kill


async def test_sigterm_mid_stream_finishes_the_batch_commits_and_exits_zero(
    broker, topics, service, fast_catalog, reliability_log
):
    n = 2_000
    sent = await stream(broker, topics, n)
    svc = service(SHELFMATCH_CATALOG=str(fast_catalog))
    svc.wait_ready()
    start = time.monotonic()
    await read_until(broker.bootstrap, topics.output, events_seen(n // 5), timeout_s=300)
    stopping = time.monotonic()
    assert svc.terminate(timeout_s=60) == 0
    drain_s = time.monotonic() - stopping
    second = service(SHELFMATCH_CATALOG=str(fast_catalog))
    second.wait_ready()
    await read_until(broker.bootstrap, topics.output, events_seen(n), timeout_s=300)
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent)
    reliability_log.append(
        Verdict(
            "SIGTERM mid-stream, then restart",
            n,
            lost,
            duplicated,
            round(time.monotonic() - start, 1),
            round(drain_s, 1),
            {"exit_code": 0},
        )
    )
    assert lost == 0 and duplicated == 0  # a clean stop commits everything it published
    assert drain_s < 30


async def test_broker_stop_and_start_mid_stream_loses_nothing(broker, topics, service, fast_catalog, reliability_log):
    if not broker.started_here:
        pytest.skip("needs the broker this session started (an external one cannot be restarted)")
    n = 2_000
    sent = await stream(broker, topics, n)
    svc = service(SHELFMATCH_CATALOG=str(fast_catalog), SHELFMATCH_PUBLISH_TIMEOUT_MS="3000")
    svc.wait_ready()
    start = time.monotonic()
    await read_until(broker.bootstrap, topics.output, events_seen(n // 5), timeout_s=300)
    broker.stop(keep_data=True)
    outage = time.monotonic()
    try:
        # The outage lasts until the service has noticed it: readiness drops while it cannot publish.
        wait_for(lambda: svc.get("/readyz")[0] == 503 or svc.proc.poll() is not None, 90, "the service noticing")
    finally:
        broker.restart()  # whatever happened, later tests need their broker back
    back = time.monotonic()
    await read_until(broker.bootstrap, topics.output, events_seen(n), timeout_s=600)
    recovery = time.monotonic() - back
    assert svc.proc.poll() is None, "the service must survive a broker restart"
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent)
    reliability_log.append(
        Verdict(
            "broker stop/start mid-stream",
            n,
            lost,
            duplicated,
            round(time.monotonic() - start, 1),
            round(recovery, 1),
            {"outage_s": round(back - outage, 1)},
        )
    )
    assert lost == 0


@DELIVERY
async def test_a_second_consumer_joining_and_leaving_loses_nothing(
    broker, topics, service, fast_catalog, reliability_log, delivery
):
    """Photos keep arriving while a second member joins (rebalance) and leaves (rebalance back),
    so both members have work whatever their speed."""
    n = 3_000
    settings = dict(SHELFMATCH_CATALOG=str(fast_catalog), SHELFMATCH_BATCH_SIZE="16", SHELFMATCH_DELIVERY=delivery)
    level = isolation(delivery)
    sent = await produce(broker.bootstrap, topics.input, [small_photo(i) for i in range(n // 3)])
    first = service(**settings)
    first.wait_ready()
    start = time.monotonic()
    await read_until(broker.bootstrap, topics.output, events_seen(n // 5), timeout_s=300, isolation_level=level)
    second = service(**settings)
    second.wait_ready()
    sent += await produce(broker.bootstrap, topics.input, [small_photo(i) for i in range(n // 3, 2 * n // 3)])
    second_photos = wait_for(
        lambda: metric_value(second.metrics(), 'shelfmatch_photos_total{outcome="matched"}'),
        120,
        "the second consumer taking partitions",
    )
    assert second.terminate(timeout_s=60) == 0  # leaves the group: partitions move back
    sent += await produce(broker.bootstrap, topics.input, [small_photo(i) for i in range(2 * n // 3, n)])
    await read_until(broker.bootstrap, topics.output, events_seen(n), timeout_s=600, isolation_level=level)
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent, level)
    reliability_log.append(
        Verdict(
            f"second consumer joins, then leaves, {delivery}",
            n,
            lost,
            duplicated,
            round(time.monotonic() - start, 1),
            None,
            {"photos_by_second_consumer_before_leaving": second_photos},
        )
    )
    assert lost == 0
    if delivery == "exactly-once":
        assert duplicated == 0
    assert first.proc.poll() is None


# The smallest the settings allow: a ResNet-152 batch of 32 takes 2-8 s on 2 cores (idle or busy).
MAX_POLL_MS = 1000


async def test_a_batch_slower_than_max_poll_interval_causes_no_rebalance_loop(
    broker, topics, service, tmp_path, reliability_log
):
    from catalog.build import build_catalog, references_from_folder
    from tests.photos import REFERENCES

    slow = tmp_path / "resnet152.safetensors"
    build_catalog(
        references_from_folder(REFERENCES), model="resnet152", weights="none", device="cpu", progress=False
    ).save(slow)
    n = 96
    sent = await stream(broker, topics, n)
    svc = service(
        SHELFMATCH_CATALOG=str(slow),
        SHELFMATCH_BATCH_SIZE="32",
        SHELFMATCH_MAX_POLL_INTERVAL_MS=str(MAX_POLL_MS),
        SHELFMATCH_SESSION_TIMEOUT_MS="6000",
        # torch's path: OpenVINO embeds this batch in under a second here, and the scenario needs
        # batches slower than max_poll_interval_ms.
        SHELFMATCH_EXECUTION="eager",
    )
    svc.wait_ready(timeout_s=300)
    start = time.monotonic()
    await read_until(broker.bootstrap, topics.output, events_seen(n), timeout_s=600)
    text = svc.metrics()
    embed_sum = metric_value(text, 'shelfmatch_stage_latency_seconds_sum{stage="embed"}')
    embed_count = metric_value(text, 'shelfmatch_stage_latency_seconds_count{stage="embed"}')
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent)
    reliability_log.append(
        Verdict(
            "embedding slower than max_poll_interval_ms",
            n,
            lost,
            duplicated,
            round(time.monotonic() - start, 1),
            None,
            {
                "mean_batch_embed_s": round(embed_sum / max(embed_count, 1), 1),
                "max_poll_interval_s": MAX_POLL_MS / 1000,
                "commit_failures": metric_value(text, "shelfmatch_commit_failures_total"),
            },
        )
    )
    assert embed_sum / embed_count > MAX_POLL_MS / 1000, "the scenario needs batches slower than max_poll_interval_ms"
    assert lost == 0 and duplicated == 0
    assert metric_value(text, "shelfmatch_commit_failures_total") == 0  # never evicted from the group


async def test_a_missing_output_topic_holds_offsets_until_it_exists(
    broker, topics, service, fast_catalog, reliability_log
):
    from tests.kafka import unique

    missing = unique("not-yet")
    n = 300
    sent = await stream(broker, topics, n)
    svc = service(
        SHELFMATCH_CATALOG=str(fast_catalog), SHELFMATCH_OUTPUT_TOPIC=missing, SHELFMATCH_PUBLISH_TIMEOUT_MS="2000"
    )
    svc.wait_serving()  # never ready: the output probe does not find the topic
    start = time.monotonic()
    wait_for(lambda: metric_value(svc.metrics(), "shelfmatch_publish_retries_total") >= 2, 120, "publish retries")
    assert svc.get("/readyz")[0] == 503
    held = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
    assert all(v is None for v in held.values()), f"offsets moved while nothing was published: {held}"
    await create_topics(broker.bootstrap, missing)
    created = time.monotonic()
    await read_until(broker.bootstrap, missing, events_seen(n), timeout_s=300)
    recovery = time.monotonic() - created
    wait_for(lambda: svc.get("/readyz")[0] == 200, 30, "ready again")
    lost, duplicated, _ = await verify(broker.bootstrap, missing, sent)
    reliability_log.append(
        Verdict(
            "output topic missing, then created",
            n,
            lost,
            duplicated,
            round(time.monotonic() - start, 1),
            round(recovery, 1),
        )
    )
    assert lost == 0


def shelf_frame(i: int) -> bytes:
    """A 1920x1080 JPEG of noise (~0.6 MB): a backlog of these is far larger than the service's memory."""
    import numpy as np

    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (1080 // 8, 1920 // 8, 3), dtype=np.uint8)
    big = Image.fromarray(pixels).resize((1920, 1080), Image.Resampling.NEAREST)
    return encode(big, "JPEG", quality=85)


async def drain_peak_rss(broker, service, fast_catalog, frames: list[bytes], n: int) -> tuple[int, int, int, int]:
    """Backlog of n frames drained by a fresh service: (lost, duplicated, rss at ready, peak rss)."""
    from tests.kafka import unique

    topic, out, group = unique("backlog"), unique("backlog-out"), unique("g")
    await create_topics(broker.bootstrap, topic, partitions=3)
    await create_topics(broker.bootstrap, out, out + ".dlq")
    sent = await produce(broker.bootstrap, topic, [frames[i % len(frames)] for i in range(n)])
    svc = service(
        SHELFMATCH_CATALOG=str(fast_catalog),
        SHELFMATCH_BATCH_SIZE="32",
        SHELFMATCH_INPUT_TOPIC=topic,
        SHELFMATCH_OUTPUT_TOPIC=out,
        SHELFMATCH_DLQ_TOPIC=out + ".dlq",
        SHELFMATCH_GROUP_ID=group,
    )
    svc.wait_ready()
    proc = psutil.Process(svc.proc.pid)
    baseline = peak = proc.memory_info().rss
    task = asyncio.create_task(read_until(broker.bootstrap, out, events_seen(n), timeout_s=900))
    while not task.done():
        peak = max(peak, proc.memory_info().rss)
        await asyncio.wait({task}, timeout=0.2)  # sampling interval, not synchronisation
    await task
    lost, duplicated, _ = await verify(broker.bootstrap, out, sent)
    svc.terminate()
    return lost, duplicated, baseline, peak


async def test_resident_memory_does_not_grow_with_the_backlog(broker, service, fast_catalog, reliability_log):
    """The same service drains a backlog of full-HD frames 8x larger than another: peak memory
    must grow by much less than the extra backlog (fetch, queues and batches are bounded).

    A consumer that reads ahead without bound grows by about the whole extra backlog (690 MB
    here); a bounded one only by the noise of its working set (fetch buffers, batches, allocator),
    which measured up to 190 MB between two drains. The bound is half the extra backlog.
    """
    frames = [shelf_frame(i) for i in range(20)]
    start = time.monotonic()
    small = await drain_peak_rss(broker, service, fast_catalog, frames, 300)
    large = await drain_peak_rss(broker, service, fast_catalog, frames, 2_400)
    backlog = [sum(len(frames[i % len(frames)]) for i in range(n)) for n in (300, 2_400)]
    growth_small, growth_large = small[3] - small[2], large[3] - large[2]
    bound = growth_small + (backlog[1] - backlog[0]) / 2
    reliability_log.append(
        Verdict(
            "backlog of 2,400 full-HD frames",
            2_400,
            large[0],
            large[1],
            round(time.monotonic() - start, 1),
            None,
            {
                "backlog_mb": round(backlog[1] / 1e6),
                "rss_at_ready_mb": round(large[2] / 1e6),
                "rss_peak_mb": round(large[3] / 1e6),
                "rss_growth_mb_300_frames": round(growth_small / 1e6),
                "rss_growth_mb_2400_frames": round(growth_large / 1e6),
                "bound_mb": round(bound / 1e6),
                "held": bool(growth_large < bound),
            },
        )
    )
    assert small[0] == 0 and large[0] == 0
    # 1,200 frames before the fetch size was bounded: 592 MB against 304 for 300 frames.
    assert growth_large < bound, (
        f"RSS grew {growth_large / 1e6:.0f} MB draining 2,400 frames against {growth_small / 1e6:.0f} MB for 300; "
        f"the bound is {bound / 1e6:.0f} MB"
    )
