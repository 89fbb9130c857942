"""A stuck model stage (reliability row 14): a model call that never returns turns /healthz red
within SHELFMATCH_STALL_TIMEOUT_S, and the stall gauge reads 1; once it returns, nothing is lost.

The service runs in this process, built by ``Service.build`` like the real one, so that the test
can put a gate in the one real seam a hung model hides behind: the catalogue's embedder, whose
forward pass here waits on an Event before running the real model.
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import torch
from prometheus_client import CollectorRegistry

from consumer.app import Service
from consumer.settings import Settings
from tests.fault.conftest import verify
from tests.fault.test_faults import events_seen, stream
from tests.kafka import read_until


class GatedEmbedder:
    """The catalogue's embedder, whose ``embed`` blocks until ``gate`` is set."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self._inner = inner
        self.gate = gate
        self.entered = threading.Event()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait()
        return self._inner.embed(images)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_a_model_call_that_never_returns_turns_healthz_red_within_the_bound(broker, topics, fast_catalog):
    bound_s = 3.0
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap, group_id=topics.group, input_topic=topics.input,
        output_topic=topics.output, dlq_topic=topics.dlq, catalog=fast_catalog, device="cpu", threshold=0.7,
        metrics_host="127.0.0.1", metrics_port=0, batch_size=8, session_timeout_ms=6000, catalog_poll_s=0,
        stall_timeout_s=bound_s,
    )
    service = await Service.build(settings, CollectorRegistry())
    port = service.http.server_port
    gate = threading.Event()
    gated = GatedEmbedder(service.recognizer.embedder, gate)
    service.recognizer.embedder = gated  # type: ignore[assignment]
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        sent = await stream(broker, topics, 24)
        assert await asyncio.to_thread(gated.entered.wait, 120), "no batch reached the model"
        entered = time.monotonic()
        assert status(port, "/healthz")[0] == 200, "red before the bound"
        while status(port, "/healthz")[0] == 200:
            assert time.monotonic() - entered < bound_s + 2.0, "/healthz still green past the bound"
            await asyncio.sleep(0.1)
        red_after = time.monotonic() - entered
        assert red_after >= bound_s - 0.5, f"red after {red_after:.1f}s, before the {bound_s}s bound"
        assert "shelfmatch_pipeline_stalled 1.0" in status(port, "/metrics")[1]
        gate.set()  # the model returns: the stage completes, liveness recovers, every photo is published
        await read_until(broker.bootstrap, topics.output, events_seen(len(sent)))
        assert status(port, "/healthz")[0] == 200
        assert "shelfmatch_pipeline_stalled 0.0" in status(port, "/metrics")[1]
        lost, _, _ = await verify(broker.bootstrap, topics.output, sent)
        assert lost == 0
        stop.set()
        assert await asyncio.wait_for(running, 60) == 0
    finally:
        gate.set()
        stop.set()
        if not running.done():
            await asyncio.wait_for(running, 60)
        service.close()
