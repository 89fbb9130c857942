"""Readiness tells the truth (reliability row 16), and a publish stall never fails liveness
(row 14's other half): each on the real broker, with the service as a child process."""
from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient

from tests.fault.conftest import wait_for
from tests.fault.test_faults import events_seen, metric_value, stream
from tests.kafka import create_topics, read_until


async def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s}s"
        await asyncio.sleep(0.1)


class HoldRevocation(ConsumerRebalanceListener):
    """Keeps a rebalance open: the member does not rejoin until ``release`` is set, so the group
    coordinator holds every joining member without an assignment (up to the rebalance timeout)."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:  # the first join revokes nothing
            self.holding.set()
            await self.release.wait()

    async def on_partitions_assigned(self, assigned) -> None:
        pass


async def test_not_ready_until_the_group_assigns_partitions(broker, topics, service, fast_catalog):
    listener = HoldRevocation()
    holder = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=topics.group, enable_auto_commit=False,
                              session_timeout_ms=30_000, rebalance_timeout_ms=120_000)
    await holder.start()
    try:
        holder.subscribe([topics.input], listener=listener)
        await until(lambda: bool(holder.assignment()), 60, "the holder's assignment")
        svc = service(SHELFMATCH_CATALOG=str(fast_catalog))
        await asyncio.wait_for(listener.holding.wait(), 120)  # the service's join opened a rebalance
        await asyncio.to_thread(svc.wait_serving)
        await until(lambda: "consuming" in svc.log(), 30, "the service subscribing")
        # Subscribed, both topics there, nothing published: only the assignment is missing. The
        # probe (every 5 s) and the tick (every 1 s) get two rounds in this window.
        observed = time.monotonic()
        while time.monotonic() - observed < 11:
            assert svc.get("/readyz")[0] == 503, "ready without an assignment"
            await asyncio.sleep(0.5)
        assert metric_value(svc.metrics(), "shelfmatch_partition_assignments_total") == 0
        listener.release.set()
        await asyncio.to_thread(svc.wait_ready, 60)
        assert metric_value(svc.metrics(), "shelfmatch_partition_assignments_total") >= 1
    finally:
        listener.release.set()
        await holder.stop()


async def test_deleting_the_output_topic_drops_readiness_and_the_publish_stall_keeps_it_alive(
    broker, topics, service, fast_catalog
):
    bound_s = 2.0
    svc = service(SHELFMATCH_CATALOG=str(fast_catalog), SHELFMATCH_STALL_TIMEOUT_S=str(bound_s),
                  SHELFMATCH_PUBLISH_TIMEOUT_MS="2000")
    await asyncio.to_thread(svc.wait_ready)
    await stream(broker, topics, 8)
    await read_until(broker.bootstrap, topics.output, events_seen(8))
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topics.output])
    finally:
        await admin.close()
    await asyncio.to_thread(wait_for, lambda: svc.get("/readyz")[0] == 503, 60, "readiness dropping")
    # Photos keep coming while nothing can be published: a publish stall, many stall bounds long.
    await stream(broker, topics, 40)
    await asyncio.to_thread(wait_for, lambda: metric_value(svc.metrics(), "shelfmatch_publish_retries_total") >= 3,
                            60, "publish retries")
    stalled_since = time.monotonic()
    while time.monotonic() - stalled_since < 4 * bound_s:
        assert svc.get("/healthz")[0] == 200, "a publish stall failed liveness"
        assert metric_value(svc.metrics(), "shelfmatch_pipeline_stalled") == 0
        assert svc.get("/readyz")[0] == 503
        await asyncio.sleep(0.5)
    await create_topics(broker.bootstrap, topics.output)
    await read_until(broker.bootstrap, topics.output, events_seen(40), timeout_s=120)
    await asyncio.to_thread(wait_for, lambda: svc.get("/readyz")[0] == 200, 60, "ready again")
    assert svc.proc.poll() is None
