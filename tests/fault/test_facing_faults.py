"""kill -9 while shelf frames are in flight: facings are the unit of batching, so one frame's
facings are spread over several model batches when the process dies. Nothing may be lost, and no
event may come out with only part of a frame's facings."""
from __future__ import annotations

import json
import time

import pytest

from tests import shelves as S
from tests.fault.conftest import Verdict, small_photo, verify
from tests.kafka import committed, produce, read_until

pytestmark = [pytest.mark.integration, pytest.mark.fault]

FACINGS = 7  # not a divisor of the batch size: frames straddle model batches
BATCH = 8


async def test_kill_9_with_frames_spanning_batches_loses_nothing_and_no_event_is_partial(
    broker, topics, service, tmp_path_factory, reliability_log
):
    catalog = S.build_shelf_catalog(tmp_path_factory.mktemp("shelf"))
    frame = S.frame([S.SKUS[i % 4] if i != 3 else None for i in range(FACINGS)])
    boxes = S.boxes_header(FACINGS)
    n = 600  # two frames to every whole photo
    values, headers = [], []
    for i in range(n):
        if i % 3 == 2:
            values.append(small_photo(i))
            headers.append([])
        else:
            values.append(frame)
            headers.append([("shelfmatch-boxes", boxes)])
    sent = await produce(broker.bootstrap, topics.input, values, headers=headers)
    frames = {s.event_id for s, h in zip(sent, headers, strict=True) if h}
    settings = dict(SHELFMATCH_CATALOG=str(catalog), SHELFMATCH_BATCH_SIZE=str(BATCH), SHELFMATCH_THRESHOLD="0.5")
    start = time.monotonic()
    kills = []
    for k in (1, 2):
        svc = service(**settings)
        svc.wait_ready()
        await read_until(broker.bootstrap, topics.output,
                         lambda rs, want=int(n * 0.3 * k): len({json.loads(r.value)["event_id"] for r in rs}) >= want,
                         timeout_s=600)
        svc.kill()  # SIGKILL: facings of the frames being matched die with it
        done = await committed(broker.bootstrap, topics.group, topics.input, topics.partitions)
        kills.append(sum(v or 0 for v in done.values()))
    last = service(**settings)
    last.wait_ready()
    recovered_from = time.monotonic()
    records = await read_until(broker.bootstrap, topics.output,
                               lambda rs: len({json.loads(r.value)["event_id"] for r in rs}) >= n, timeout_s=900)
    recovery = time.monotonic() - recovered_from
    lost, duplicated, _ = await verify(broker.bootstrap, topics.output, sent)
    reliability_log.append(Verdict(f"consumer kill -9 x2 with shelf frames in flight ({n} photos, "
                                   f"{FACINGS} facings per frame, batch {BATCH}), at-least-once", n, lost, duplicated,
                                   round(time.monotonic() - start, 1), round(recovery, 1),
                                   {"committed_at_each_kill": kills}))
    assert lost == 0
    assert kills == sorted(kills) and kills[-1] < n  # each kill really happened mid-stream
    events = [json.loads(r.value) for r in records]
    for event in events:
        if event["event_id"] in frames:
            assert event["schema_version"] == 2
            assert [f["box_id"] for f in event["facings"]] == [f"b{i}" for i in range(FACINGS)]
            assert sum(event["summary"]["counts"].values()) == FACINGS
        else:
            assert event["schema_version"] == 1
