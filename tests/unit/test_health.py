"""Readiness's parts and the stall watchdog, without a broker (the broker-backed checks are in
tests/integration/test_readiness.py and tests/fault/test_stall.py)."""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from consumer.health import Health, Watchdog
from consumer.metrics import Metrics


def test_ready_needs_an_assignment_the_topics_and_no_failed_publish():
    metrics = Metrics(CollectorRegistry())
    health = Health(metrics.ready)
    health.set(consuming=True)
    assert not health.ready, "subscribed but not yet assigned"
    health.set(joined=True)
    assert health.ready and health.publishing is None, "no publish yet: the output probe stands for it"
    health.set(output_found=False)
    assert not health.ready
    health.set(output_found=True, publishing=False)
    assert not health.ready and metrics.registry.get_sample_value("shelfmatch_ready") == 0
    health.set(publishing=True)
    assert health.ready and metrics.registry.get_sample_value("shelfmatch_ready") == 1
    health.set(input_found=False)
    assert not health.ready


def test_the_watchdog_trips_only_on_work_running_past_its_bound_and_the_gauge_follows():
    metrics = Metrics(CollectorRegistry())
    dog = Watchdog(10.0, metrics.pipeline_stalled)
    gauge = lambda: metrics.registry.get_sample_value("shelfmatch_pipeline_stalled")  # noqa: E731
    assert not dog.stalled() and gauge() == 0
    with dog.running("model"):
        now = time.monotonic()
        assert not dog.stalled(now + 9.0)
        assert dog.stuck(now + 11.0)[0][0] == "model" and dog.stalled(now + 11.0)
    assert not dog.stalled(now + 1000.0), "finished work never counts"
    assert gauge() == 0


def test_the_stall_gauge_reads_1_at_scrape_time_while_work_is_stuck():
    metrics = Metrics(CollectorRegistry())
    dog = Watchdog(0.0, metrics.pipeline_stalled)  # any running work is over a zero bound
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:
        with dog.running("decode"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=stuck)
    t.start()
    try:
        assert entered.wait(10)
        assert metrics.registry.get_sample_value("shelfmatch_pipeline_stalled") == 1
    finally:
        release.set()
        t.join()
    assert metrics.registry.get_sample_value("shelfmatch_pipeline_stalled") == 0
