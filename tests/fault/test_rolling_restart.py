"""A rolling restart of 3 replicas under a steady stream (reliability row 15): 3 service processes
in one group on the real broker, each stopped with SIGTERM and started again in turn, as a
StatefulSet rollout does (stop, then start the same pod name).

Three runs, the same but for group timing:

- ``before``: the timing as it was: dynamic membership, session timeout 30 s, heartbeat a third of
  it (10 s). A stopping member leaves the group and its replacement joins as a new member: two
  stop-the-world rebalances per restart, and members learn of each only at their next heartbeat;
- ``dynamic``: what a Deployment gets now: dynamic membership, 3 s heartbeat;
- ``static``: what stable pod names (a StatefulSet) allow: SHELFMATCH_GROUP_INSTANCE_ID per
  replica, a session timeout above a replica's restart, 3 s heartbeat. A stopping member does not
  leave; coming back within the session timeout it takes its own partitions back, with no
  rebalance, while the other replicas' partitions keep flowing; its own wait the whole restart.

Counted for each: photos lost (must be 0) and duplicated; rebalances (new group generations during
the restarts, from aiokafka's "Joined group ... (generation N)" lines); seconds without progress,
from the events' ``processed_at``: for the group (gaps between any two events longer than
:data:`GAP_S`) and per input partition (the same gaps, summed over partitions). The figures go to
``out/reliability/results.json`` (scripts/reliability_report.py). Rerun alone:
``.venv/bin/python -m pytest -q -s tests/fault/test_rolling_restart.py``.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from datetime import datetime

import pytest

from tests.fault.conftest import Verdict, verify
from tests.fault.test_catalog_swap import steady
from tests.kafka import create_topics, read_all, unique

PARTITIONS = 6
GAP_S = 1.0  # at 40 photos/s (test_catalog_swap.RATE) over 6 partitions, flowing events are never this far apart
# Static membership needs a session above a replica's restart (SIGTERM to ready again: process
# start, model load, join), which took 40-90 s on the shared 2-core machine.
SCENARIOS = {
    "before": {"SHELFMATCH_SESSION_TIMEOUT_MS": "30000", "SHELFMATCH_HEARTBEAT_INTERVAL_MS": "10000"},
    "dynamic": {"SHELFMATCH_SESSION_TIMEOUT_MS": "30000", "SHELFMATCH_HEARTBEAT_INTERVAL_MS": "3000"},
    "static": {"SHELFMATCH_SESSION_TIMEOUT_MS": "120000", "SHELFMATCH_HEARTBEAT_INTERVAL_MS": "3000"},
}
GENERATION = re.compile(r"Joined group '[^']+' \(generation (\d+)\)")


def generations(services) -> set[int]:
    return {int(g) for s in services for g in GENERATION.findall(s.log_path.read_text(errors="replace"))}


def stall_seconds(times: list[float], start: float, end: float) -> float:
    """Time inside [start, end] not covered by events at most GAP_S apart."""
    points = sorted([start, *(t for t in times if start <= t <= end), end])
    return sum(b - a for a, b in zip(points, points[1:], strict=False) if b - a > GAP_S)


@pytest.mark.parametrize("timing", list(SCENARIOS))
async def test_a_rolling_restart_of_3_replicas_loses_nothing(broker, service, fast_catalog, reliability_log, timing):
    topic, out, group = unique("roll"), unique("roll-out"), unique("g")
    await create_topics(broker.bootstrap, topic, partitions=PARTITIONS)
    await create_topics(broker.bootstrap, out, out + ".dlq")
    base = dict(SHELFMATCH_CATALOG=str(fast_catalog), SHELFMATCH_INPUT_TOPIC=topic, SHELFMATCH_OUTPUT_TOPIC=out,
                SHELFMATCH_DLQ_TOPIC=out + ".dlq", SHELFMATCH_GROUP_ID=group, **SCENARIOS[timing])
    session_s = int(SCENARIOS[timing]["SHELFMATCH_SESSION_TIMEOUT_MS"]) / 1000

    def replica(slot: int):
        extra = {"SHELFMATCH_GROUP_INSTANCE_ID": f"{group}-{slot}"} if timing == "static" else {}
        return service(**base, **extra)

    started = [replica(slot) for slot in range(3)]
    for svc in started:
        await asyncio.to_thread(svc.wait_ready, 300)
    stop, sent = asyncio.Event(), []
    producing = asyncio.create_task(steady(broker.bootstrap, topic, stop, sent))
    try:
        await asyncio.sleep(3)  # a few seconds of steady flow before the first restart (pacing)
        before = max(generations(started))
        restart_began = time.time()
        exit_codes, restart_s = [], []
        current = list(started)
        for slot in range(3):
            began = time.monotonic()
            exit_codes.append(await asyncio.to_thread(current[slot].terminate, 90))
            current[slot] = replica(slot)
            await asyncio.to_thread(current[slot].wait_ready, 300)
            restart_s.append(round(time.monotonic() - began, 1))
        restart_ended = time.time()
        await asyncio.sleep(3)  # steady flow after the last restart (pacing)
    finally:
        stop.set()
        await producing
    deadline = time.monotonic() + 180
    while True:
        lost, duplicated, _ = await verify(broker.bootstrap, out, sent)
        if lost == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    every = started + [s for s in current if s not in started]
    rebalances = max(generations(every)) - before
    records = await read_all(broker.bootstrap, out)
    at: dict[int, list[float]] = defaultdict(list)
    for r in records:
        event = json.loads(r.value)
        at[event["source"]["partition"]].append(datetime.fromisoformat(event["processed_at"]).timestamp())
    group_stall = stall_seconds([t for ts in at.values() for t in ts], restart_began, restart_ended)
    stalls = [stall_seconds(at[p], restart_began, restart_ended) for p in range(PARTITIONS)]
    partition_stall = sum(stalls)
    notes = {"timing": timing, "rebalances": rebalances, "group_stall_s": round(group_stall, 1),
             "partition_stall_s": round(partition_stall, 1), "worst_partition_stall_s": round(max(stalls), 1),
             "restart_s": restart_s,
             "restart_window_s": round(restart_ended - restart_began, 1),
             "exit_codes": exit_codes, **SCENARIOS[timing], "held": lost == 0}
    print(f"rolling restart, {timing}: {notes}, sent {len(sent)}, lost {lost}, duplicated {duplicated}")
    reliability_log.append(Verdict(f"rolling restart of 3 replicas, {timing}", len(sent), lost,
                                   duplicated, round(restart_ended - restart_began, 1), None, notes))
    assert lost == 0
    assert exit_codes == [0, 0, 0]
    if timing == "static" and max(restart_s) < session_s:
        assert rebalances == 0, f"{rebalances} rebalances although every replica came back under its own id"
