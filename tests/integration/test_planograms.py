"""Planogram compliance on the real broker: the planogram topic read whole by every replica,
and shelf frames through `shelfmatch consume` (events per frame, dead letters for bad regions)."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import CollectorRegistry

from consumer.admin import create_topics as create_service_topics
from consumer.app import consumer_config
from consumer.errors import ConfigurationError
from consumer.metrics import Metrics
from consumer.planograms import FilePlanograms, PlanogramTable, TopicPlanograms
from consumer.settings import Settings
from tests import shelves as S
from tests.kafka import create_topics, produce, read_all, read_until, unique
from tests.photos import encode
from tests.service import Service

pytestmark = pytest.mark.integration

CATALOG_SKUS = (*S.SKUS, "__empty__")


def plan(camera: str, version: str, expected: list[str] | None = None, **extra) -> bytes:
    return json.dumps({**S.planogram(camera, expected or list(S.SKUS), version=version), **extra}).encode()


async def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(0.05)


def rejections(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("shelfmatch_planogram_rejections_total", {"reason": reason})


async def test_topic_create_makes_the_planogram_topic_compacted(broker):
    topic = unique("planograms")
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap, input_topic=unique("in"), output_topic=unique("out"),
                        dlq_topic=unique("dlq"), planogram_topic=topic)
    lines = await create_service_topics(settings, partitions=1, replication_factor=1, retention_ms=3_600_000)
    assert any(line.startswith(f"{topic}: created") for line in lines)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    deadline = time.monotonic() + 30
    try:
        while True:  # a topic just created is unknown to describe_configs for a moment
            [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            error_code, *_, entries = described.resources[0]
            if error_code == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    configs = {name: value for name, value, *_ in entries}
    assert configs["cleanup.policy"] == "compact"


async def test_every_replica_reads_the_whole_topic_the_latest_record_wins_and_a_tombstone_removes(broker):
    topic = unique("planograms")
    await create_topics(broker.bootstrap, topic, partitions=3)
    await produce(broker.bootstrap, topic, [
        plan("cam-1", "v1"), plan("cam-2", "v1"), plan("cam-1", "v2"), None,  # type: ignore[list-item]
        plan("cam-3", "v1", ["Not-A-Product", *S.SKUS[1:]]), plan("cam-9", "v1"), b"{not json",
    ], keys=[b"cam-1", b"cam-2", b"cam-1", b"cam-2", b"cam-3", b"cam-4", b"cam-5"])
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap)
    tables = [PlanogramTable(Metrics(CollectorRegistry()), lambda: CATALOG_SKUS) for _ in range(2)]
    ready = [asyncio.Event() for _ in tables]
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(t.follow(TopicPlanograms(topic, consumer_config(settings)), r))
                 for t, r in zip(tables, ready, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
        for table in tables:  # two replicas: each holds every camera, whatever partition it is on
            assert {c: p.version for c, p in table.snapshot().items()} == {"cam-1": "v2"}
            metrics = table._metrics
            assert rejections(metrics, "unknown-sku") == 1
            assert rejections(metrics, "camera-mismatch") == 1
            assert rejections(metrics, "malformed") == 1
            assert metrics.registry.get_sample_value("shelfmatch_planograms") == 1
        # A change applies while running; an invalid one leaves the previous planogram in force.
        await produce(broker.bootstrap, topic, [plan("cam-1", "v3", slots=[]), plan("cam-2", "v7")],
                      keys=[b"cam-1", b"cam-2"])
        await wait_until(lambda: all("cam-2" in t.snapshot() for t in tables), 30, "cam-2 back on both replicas")
        for table in tables:
            assert table.snapshot()["cam-1"].version == "v2"
            assert rejections(table._metrics, "malformed") == 2
        for task in tasks:
            task.cancel()


async def test_a_missing_planogram_topic_is_a_configuration_error(broker):
    source = TopicPlanograms(unique("absent"), consumer_config(Settings(kafka_bootstrap_servers=broker.bootstrap)))
    with pytest.raises(ConfigurationError, match="does not exist"):
        async for _ in source.records():
            pass


async def test_the_file_source_refuses_a_bad_planogram_and_keeps_the_others(tmp_path):
    path = tmp_path / "planograms.json"
    good = json.loads(plan("cam-1", "v1"))
    overlapping = json.loads(plan("cam-2", "v1"))
    overlapping["slots"][1]["region"] = overlapping["slots"][0]["region"]
    path.write_text(json.dumps([good, overlapping]))
    table = PlanogramTable(Metrics(CollectorRegistry()), lambda: CATALOG_SKUS)
    await table.follow(FilePlanograms(path))
    assert list(table.snapshot()) == ["cam-1"]
    assert rejections(table._metrics, "overlapping-slots") == 1
    path.write_text('{"camera_id": "cam-1"}')
    with pytest.raises(ConfigurationError, match="JSON array"):
        await table.follow(FilePlanograms(path))


@pytest.fixture(scope="module")
def shelf_catalog(tmp_path_factory):
    return S.build_shelf_catalog(tmp_path_factory.mktemp("shelf"))


@pytest.fixture
def shelf_service(broker, shelf_catalog, topics, tmp_path):
    planogram_topic = unique("planograms")
    svc = Service({
        "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "SHELFMATCH_GROUP_ID": topics.group,
        "SHELFMATCH_INPUT_TOPIC": topics.input, "SHELFMATCH_OUTPUT_TOPIC": topics.output,
        "SHELFMATCH_DLQ_TOPIC": topics.dlq, "SHELFMATCH_CATALOG": str(shelf_catalog),
        "SHELFMATCH_PLANOGRAM_TOPIC": planogram_topic, "SHELFMATCH_THRESHOLD": "0.5", "SHELFMATCH_BATCH_SIZE": "6",
        "SHELFMATCH_BATCH_MAX_WAIT_MS": "50", "SHELFMATCH_SESSION_TIMEOUT_MS": "6000",
    }, tmp_path / "service.log")
    yield svc, planogram_topic
    svc.close()
    if svc.log_path.exists():  # pytest shows it for a failed test only
        print(f"--- service log ---\n{svc.log()}")


async def test_shelf_frames_through_the_service(broker, shelf_service, topics):
    """Frames by planogram and by boxes, a whole photo, and every bad-region case: one event or
    one dead letter each, with its reason; a planogram published meanwhile applies at once."""
    svc, planogram_topic = shelf_service
    await create_topics(broker.bootstrap, planogram_topic)
    frame_plan = json.loads(plan("cam-1", "v1"))
    frame_plan["frame"] = {"width": 640, "height": 160}
    await produce(broker.bootstrap, planogram_topic, [json.dumps(frame_plan).encode()], keys=[b"cam-1"])
    svc.start().wait_ready()

    shelf = S.frame([S.SKUS[0], None, S.SKUS[2], S.SKUS[0]])  # a gap, a misplaced product
    tiny = encode(S.reference(S.SKUS[0]).resize((120, 30)), "JPEG")
    boxes = S.boxes_header(4)
    cases = [  # (key, value, extra headers, expected outcome)
        (b"cam-1", shelf, [], "planogram"),
        (b"cam-7", shelf, [("shelfmatch-boxes", boxes)], "boxes"),
        (b"cam-1", shelf, [("shelfmatch-boxes", boxes)], "boxes"),
        (b"cam-7", encode(S.reference(S.SKUS[1]), "JPEG"), [], "whole"),
        (b"cam-7", shelf, [("shelfmatch-boxes", b"[{\"box\": [0, 0, 1]")], "bad-boxes"),
        (b"cam-7", shelf, [("shelfmatch-boxes", b'[{"box": [0.5, 0.1, 1.3, 0.9]}]')], "bad-region"),
        (b"cam-7", shelf, [("shelfmatch-boxes", b'[{"box": [0.5, 0.1, 0.5, 0.9]}]')], "bad-region"),
        (b"cam-1", tiny, [], "frame-too-small"),
    ]
    sent = await produce(broker.bootstrap, topics.input, [c[1] for c in cases], keys=[c[0] for c in cases],
                         headers=[[("camera-id", c[0]), *c[2]] for c in cases], partitions=[0] * len(cases))
    events = {json.loads(r.value)["event_id"]: json.loads(r.value) for r in await read_until(
        broker.bootstrap, topics.output, lambda rs: len(rs) >= 4, timeout_s=90)}
    dead = {f"{topics.input}/0/{dict(r.headers)['dlq-source-offset'].decode()}": dict(r.headers)["dlq-reason"].decode()
            for r in await read_until(broker.bootstrap, topics.dlq, lambda rs: len(rs) >= 4, timeout_s=30)}
    assert set(events) | set(dead) == {s.event_id for s in sent} and not set(events) & set(dead)  # none lost
    for s, (_, _, _, want) in zip(sent, cases, strict=True):
        if want in ("planogram", "boxes"):
            assert events[s.event_id]["schema_version"] == 2 and events[s.event_id]["regions_from"] == want
        elif want == "whole":
            assert events[s.event_id]["schema_version"] == 1
        else:
            assert dead[s.event_id] == want
    by_plan = events[sent[0].event_id]
    assert [f["status"] for f in by_plan["facings"]] == ["ok", "empty", "ok", "wrong-product"]
    assert by_plan["planogram"] == {"camera_id": "cam-1", "version": "v1"}
    assert by_plan["summary"]["counts"] == {"ok": 2, "wrong-product": 1, "empty": 1, "unknown": 0}
    assert [f["slot"] for f in events[sent[2].event_id]["facings"]] == ["r0p0", "r0p1", "r0p2", "r0p3"]
    assert [f["slot"] for f in events[sent[1].event_id]["facings"]] == [None] * 4  # cam-7 has no planogram

    # A new planogram version applies without a restart: the next frame names it.
    await produce(broker.bootstrap, planogram_topic, [plan("cam-1", "v2", [S.SKUS[0], S.SKUS[1], S.SKUS[2],
                                                                           S.SKUS[0]])], keys=[b"cam-1"])
    deadline = time.monotonic() + 60
    version, offset = None, None
    while version != "v2":
        assert time.monotonic() < deadline, "planogram v2 never applied"
        [later] = await produce(broker.bootstrap, topics.input, [shelf], keys=[b"cam-1"], partitions=[0])
        records = await read_until(broker.bootstrap, topics.output,
                                   lambda rs, o=later.event_id: any(json.loads(r.value)["event_id"] == o for r in rs))
        event = next(json.loads(r.value) for r in records if json.loads(r.value)["event_id"] == later.event_id)
        version, offset = event["planogram"]["version"], later.offset
    assert offset is not None
    assert [f["status"] for f in event["facings"]] == ["ok", "empty", "ok", "ok"]

    def facings() -> Counter:
        return Counter({line.split('"')[1]: float(line.split()[-1]) for line in svc.metrics().splitlines()
                        if line.startswith("shelfmatch_facings_total{")})

    # Counted once the broker acknowledges each event, so a scrape may come just before the last.
    await wait_until(lambda: facings()["ok"] >= 7, 30, "facings of every event counted")
    counted = facings()
    assert counted["empty"] >= 4 and counted["wrong-product"] >= 2 and counted["unknown"] == 3
    assert len(await read_all(broker.bootstrap, topics.dlq)) == 4
