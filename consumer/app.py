"""Process entry of ``shelfmatch consume``.

Building and running are apart: :meth:`Service.build` makes everything the service needs (the
catalogue's model, warmed up; worker pools; the Kafka clients and the sink; the HTTP server) and
:meth:`Service.run` runs it until SIGTERM/SIGINT, with one TaskGroup owning every task.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import torch
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context
from prometheus_client import CollectorRegistry, make_wsgi_app

from catalog.embedder import Embedder, resolve_device
from catalog.errors import CatalogError, FingerprintMismatchError
from catalog.jpeg_batch import JpegBatchDecoder
from catalog.matcher import Matcher
from catalog.models import backbone_of
from catalog.preprocess import DecodeLimits
from catalog.store import Catalog
from consumer.acls import check_input_readable, missing_acl
from consumer.delivery import PartitionOwner, Sink
from consumer.errors import ConfigurationError
from consumer.facings import Frames
from consumer.health import Health, Watchdog
from consumer.metrics import Metrics
from consumer.pipeline import DrainOnRevoke, Recognizer, Topics, run_pipeline
from consumer.planograms import FilePlanograms, PlanogramTable, TopicPlanograms
from consumer.probe import OutputProbe
from consumer.settings import Settings, available_cpus
from consumer.sink import AtLeastOnceSink
from consumer.source import InFlight
from consumer.transactions import TransactionalSink
from consumer.unreadable import UnreadableBatchError, UnreadableBatches
from consumer.watcher import CatalogWatcher, FileIdentity, operating_point

log = logging.getLogger(__name__)

HEALTH_STALE_S = 30.0  # /healthz fails if the event loop has not ticked for this long
# How old the consumer's topic metadata may get: a topic created after the service started (or a
# misspelt one fixed) is seen within this time, not aiokafka's default of 5 minutes.
METADATA_MAX_AGE_MS = 10_000
TOPIC_GRACE_S = 5.0  # the first metadata answer may take this long before a missing topic is reported
# Room for a record's key, headers and batch framing beyond the largest photo we accept.
RECORD_OVERHEAD_BYTES = 1024 * 1024


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of every Kafka client: the CA that verifies the brokers and, for mutual TLS, the
    client certificate and key. The files are read once, here: a rotated certificate or CA takes
    effect on the next start (docs/operations.md, "Rotate Kafka credentials")."""
    try:
        return create_ssl_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
            certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        )
    except (OSError, ssl.SSLError) as exc:  # a missing file, not PEM, or a key of another certificate
        raise ConfigurationError(
            f"cannot load the TLS files (SHELFMATCH_SSL_CAFILE={settings.ssl_cafile}, "
            f"SHELFMATCH_SSL_CERTFILE={settings.ssl_certfile}, SHELFMATCH_SSL_KEYFILE={settings.ssl_keyfile}): {exc}"
        ) from exc


def kafka_security(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured security protocol (secrets never logged)."""
    kwargs: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = tls_context(settings)
    if settings.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return kwargs


def consumer_config(settings: Settings) -> dict[str, Any]:
    """AIOKafkaConsumer keyword arguments: manual commits, read_committed, fetch sizes."""
    max_record = settings.max_message_bytes + RECORD_OVERHEAD_BYTES
    return dict(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=settings.group_id,
        client_id=settings.client_id, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed", session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval,
        # aiokafka's default rebalance timeout is the session timeout, which equals the default
        # drain: a member still draining would be dropped from the group it is rejoining.
        rebalance_timeout_ms=settings.rebalance_timeout, group_instance_id=settings.group_instance_id,
        max_poll_interval_ms=settings.max_poll_interval_ms, metadata_max_age_ms=METADATA_MAX_AGE_MS,
        # A record larger than one partition's fetch is skipped by aiokafka with only a log
        # line; allow the largest photo we accept (plus headers) so it reaches the DLQ instead.
        # The whole fetch is held no larger than that too: fetched data waits in memory until the
        # pipeline takes it, so a bigger fetch only grows memory on a backlog, not throughput.
        max_partition_fetch_bytes=max_record,
        fetch_max_bytes=max_record,
        **kafka_security(settings),
    )


def producer_config(settings: Settings) -> dict[str, Any]:
    """AIOKafkaProducer keyword arguments shared by both sinks: idempotent, acks from all replicas."""
    return dict(
        bootstrap_servers=settings.kafka_bootstrap_servers, client_id=settings.client_id,
        enable_idempotence=True, acks="all", max_request_size=settings.max_message_bytes + RECORD_OVERHEAD_BYTES,
        request_timeout_ms=settings.publish_timeout_ms, compression_type=settings.compression_type,
        **kafka_security(settings),
    )


def load_model(settings: Settings, catalog: Catalog, device: torch.device) -> Recognizer:
    """Rebuild the catalogue's model and refuse to run if it does not reproduce the fingerprint."""
    source = settings.weights or catalog.weights_source
    backbone = backbone_of(catalog.fingerprint, source, catalog.head())
    if backbone.fingerprint != catalog.fingerprint:
        raise FingerprintMismatchError(
            f"catalogue {settings.catalog} was built with {catalog.fingerprint.describe()} but weights "
            f"{source!r} give {backbone.fingerprint.describe()}; rebuild the catalogue or point "
            f"SHELFMATCH_WEIGHTS at the weights it was built with"
        )
    threshold, min_margin = operating_point(catalog, settings.threshold, settings.min_margin, settings.catalog)
    embedder = Embedder(backbone, device, precision=settings.precision, execution=settings.execution,
                        batch_size=settings.batch_size, cache_dir=settings.network_cache)
    matcher = Matcher(catalog, device=device, top_k=settings.top_k, threshold=threshold, min_margin=min_margin)
    on_device = settings.jpeg_decoder == "device" or (settings.jpeg_decoder == "auto" and device.type == "cuda")
    return Recognizer(embedder, matcher, catalog, JpegBatchDecoder(device) if on_device else None)


def tune_torch(device: torch.device, cpus: int) -> None:
    """cuDNN's autotuner on a GPU (shapes are fixed: batch size, input size); on a CPU, no more
    threads than ``cpus``, the CPUs this pod may use (torch counts the node's cores, not the
    container's CPU quota or request, and more threads only throttle)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif torch.get_num_threads() > cpus:
        log.info("torch CPU threads: %d -> %d (the CPUs this process may use)", torch.get_num_threads(), cpus)
        torch.set_num_threads(cpus)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def start_http(settings: Settings, registry: CollectorRegistry, health: Health, watchdog: Watchdog) -> WSGIServer:
    """Serve /metrics, /healthz (event loop alive, decode and model stages not stalled) and
    /readyz (joined, topics there, publishing: :class:`consumer.health.Health`)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok = time.monotonic() - health.last_tick < HEALTH_STALE_S and not watchdog.stalled()
        elif path == "/readyz":
            ok = health.ready
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ok\n" if ok else b"not ok\n"]

    try:
        server = make_server(settings.metrics_host, settings.metrics_port, app, _ThreadingWSGIServer, _QuietHandler)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc.strerror or exc}): "
            "set SHELFMATCH_METRICS_PORT (0 picks a free port) or SHELFMATCH_METRICS_HOST"
        ) from exc
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.server_port)
    return server


def _name_os_thread() -> None:
    """Give this worker thread's Python name (``decode_0``, ``model_0``...) to the OS as well, so
    that ``top -H``, ``ps -L`` and /proc/PID/task show which of the service's threads takes the
    CPU. Threads that the runtimes start (OpenVINO's, OpenMP's) keep the name of the thread that
    started them."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(threading.current_thread().name[:15])


def _catalog_thread() -> None:
    _name_os_thread()
    _lower_priority()


def _lower_priority() -> None:
    """Run this thread only when the CPUs have nothing else to do: loading a new catalogue must
    not take the cores the model needs. Linux's SCHED_IDLE policy (per thread; an unprivileged
    process may choose it) yields to any other thread at once; nice 10, the fallback, did not
    (bench/catalog_load.py on 2 cores, OpenVINO batches of 8 beside a 256 MB catalogue loading
    without pause: median batch time +34% at nice 10, +4% with SCHED_IDLE). It is not starved while
    a backlog keeps the model busy: a 256 MB load took 0.8 s beside back-to-back batches. If it is
    preempted holding the GIL, the others wait at most until a core frees, about one batch."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, tid, 10)


@dataclass
class Pools:
    """The worker threads: decoding (many), the model and the device decoder (one each, so
    that CUDA graphs captured on the model thread stay on it), and one that loads and uploads a
    new catalogue while the model thread keeps matching against the old one."""

    decode: ThreadPoolExecutor
    model: ThreadPoolExecutor
    device_decode: ThreadPoolExecutor
    catalog: ThreadPoolExecutor

    @classmethod
    def create(cls, decode_workers: int) -> Pools:
        return cls(
            decode=ThreadPoolExecutor(decode_workers, thread_name_prefix="decode", initializer=_name_os_thread),
            model=ThreadPoolExecutor(1, thread_name_prefix="model", initializer=_name_os_thread),
            device_decode=ThreadPoolExecutor(1, thread_name_prefix="device-decode", initializer=_name_os_thread),
            catalog=ThreadPoolExecutor(1, thread_name_prefix="catalog", initializer=_catalog_thread),
        )

    def shutdown(self) -> None:
        for pool in (self.decode, self.model, self.device_decode, self.catalog):
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Service:
    """Everything ``shelfmatch consume`` runs, built and warmed up; see :meth:`run`."""

    settings: Settings
    metrics: Metrics
    health: Health
    device: torch.device
    recognizer: Recognizer
    pools: Pools
    consumer: AIOKafkaConsumer
    sink: Sink
    owner: PartitionOwner | None  # the sink, when it follows partition ownership
    in_flight: InFlight
    http: WSGIServer
    watcher: CatalogWatcher
    watchdog: Watchdog
    probe: OutputProbe
    planograms: PlanogramTable

    @classmethod
    async def build(cls, settings: Settings, registry: CollectorRegistry) -> Service:
        """Check that Kafka is reachable (before minutes of model loading), load the catalogue and
        its model, warm it up, create the clients; start HTTP last."""
        await check_kafka(settings)
        metrics = Metrics(registry)
        health = Health(metrics.ready)
        health.set(input_found=False)  # until the consumer's metadata shows the input topic
        seen = FileIdentity.of(settings.catalog)  # before loading: a file replaced meanwhile is seen as new
        catalog = Catalog.load(settings.catalog)
        device = resolve_device(settings.device)
        tune_torch(device, available_cpus(request_millicores=settings.cpu_request_millicores))
        recognizer = load_model(settings, catalog, device)
        metrics.catalog_serving(version=catalog.version, model=catalog.fingerprint.backbone,
                                products=len(catalog.skus), references=len(catalog.row_sku),
                                device_bytes=recognizer.matcher.device_bytes)
        metrics.unreadable_batches.labels(settings.input_topic)  # exported at 0, so that alerts see the first
        pools = Pools.create(settings.decode_workers)
        # Warm up on the thread that will run the model (compiled CUDA graphs are per thread).
        warmup_s = await asyncio.get_running_loop().run_in_executor(pools.model, recognizer.warm_up)
        log.info(
            "catalogue %s: %d products, %s on %s (%s, warm-up %.1fs, JPEG decoding: %s), threshold %.3f, "
            "min margin %.3f", catalog.version, len(catalog.skus), catalog.fingerprint.describe(), device,
            recognizer.embedder.describe(), warmup_s, "device" if recognizer.jpeg_decoder else "pillow",
            recognizer.matcher.threshold, recognizer.matcher.min_margin,
        )
        consumer = AIOKafkaConsumer(**consumer_config(settings))
        sink: Sink
        owner: PartitionOwner | None
        if settings.delivery == "exactly-once":
            sink = owner = TransactionalSink(
                producer_config(settings), settings.group_id, metrics, health, consumer.assignment)
        else:
            owner = None
            sink = AtLeastOnceSink(producer_config(settings), consumer, metrics, health,
                                   timeout_s=settings.publish_timeout_ms / 1000)
        watcher = CatalogWatcher(
            settings.catalog, recognizer, pool=pools.catalog, metrics=metrics, poll_s=settings.catalog_poll_s,
            top_k=settings.top_k, threshold=settings.threshold, min_margin=settings.min_margin, seen=seen,
        )
        planograms = PlanogramTable(metrics, lambda: recognizer.matcher.skus)
        if settings.planograms is not None:
            await planograms.follow(FilePlanograms(settings.planograms))
        watchdog = Watchdog(settings.stall_timeout_s, metrics.pipeline_stalled)
        probe = OutputProbe((settings.output_topic, settings.dlq_topic), dict(
            bootstrap_servers=settings.kafka_bootstrap_servers, client_id=settings.client_id,
            request_timeout_ms=settings.publish_timeout_ms, **kafka_security(settings),
        ), timeout_s=settings.publish_timeout_ms / 1000)
        health.set(output_found=False)  # until the probe has seen both topics
        http = start_http(settings, registry, health, watchdog)
        return cls(settings=settings, metrics=metrics, health=health, device=device, recognizer=recognizer,
                   pools=pools, consumer=consumer, sink=sink, owner=owner, in_flight=InFlight(metrics), http=http,
                   watcher=watcher, watchdog=watchdog, probe=probe, planograms=planograms)

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Consume until SIGTERM/SIGINT (or ``stop`` is set), then drain; return the process exit
        code. A drain that outlasts ``shutdown_timeout_s`` is cancelled (exit 1: its photos are
        re-read); closing the Kafka clients afterwards is bounded by ``close_timeout_s``."""
        settings = self.settings
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        code = 0
        try:
            await self.sink.start()
            await self.consumer.start()
            await self.probe.start()
            listener = DrainOnRevoke(self.in_flight, settings.shutdown_timeout_s, self.metrics, self.owner,
                                     self.health)
            self.consumer.subscribe([settings.input_topic], listener=listener)
            self.health.set(consuming=True)
            log.info("consuming %s as group %s (%s)", settings.input_topic, settings.group_id, settings.delivery)
            async with asyncio.TaskGroup() as tg:
                ticker = tg.create_task(self._tick(), name="tick")
                stopping = tg.create_task(stop.wait(), name="stop")
                watching = tg.create_task(self.watcher.run(), name="catalog-watch") if settings.catalog_poll_s else None
                probing = tg.create_task(self.probe.run(self.health), name="output-probe")
                following = await self._follow_planograms(tg)
                pipeline = tg.create_task(run_pipeline(
                    self.consumer, self.sink, recognizer=self.recognizer,
                    topics=Topics(output=settings.output_topic, dead_letter=settings.dlq_topic),
                    decode_pool=self.pools.decode, model_pool=self.pools.model,
                    device_pool=self.pools.device_decode, limits=DecodeLimits(
                        max_bytes=settings.max_message_bytes, max_pixels=settings.max_image_pixels,
                        formats=settings.allowed_formats,
                    ),
                    batch_size=settings.batch_size, batch_max_wait_s=settings.batch_max_wait_ms / 1000,
                    in_flight=self.in_flight, metrics=self.metrics, stop=stop,
                    poll_every_s=settings.max_poll_interval_ms / 3000,
                    unreadable=UnreadableBatches(settings.on_unreadable_batch, consumer_config(settings), self.metrics),
                    watchdog=self.watchdog,
                    frames=Frames(self.planograms.snapshot, settings.frame_max_side),
                ), name="pipeline")
                await asyncio.wait({pipeline, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not pipeline.done():
                    log.info("stopping: draining %d in-flight photos", self.in_flight.count)
                    await asyncio.wait({pipeline}, timeout=settings.shutdown_timeout_s)
                    if not pipeline.done():
                        log.error("drain did not finish in %.0fs; uncommitted photos will be re-read",
                                  settings.shutdown_timeout_s)
                        pipeline.cancel()
                        code = 1
                ticker.cancel()
                stopping.cancel()
                probing.cancel()
                if watching is not None:
                    watching.cancel()
                if following is not None:
                    following.cancel()
        except* UnreadableBatchError as failed:  # says all there is to say in one line
            for exc in _leaves(failed):
                log.error("stopping: %s", exc)
            code = 1
        except* Exception as failed:  # a stage's error, or the clients' start (say, bad credentials)
            for exc in _leaves(failed):
                log.error("fatal error; stopping without committing unpublished photos", exc_info=exc)
                if (hint := missing_acl(exc, settings)) is not None:
                    log.error(hint)
            code = 1
        finally:
            self.health.set(consuming=False)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._close_clients()
        log.info("stopped (exit %d)", code)
        return code

    async def _close_clients(self) -> None:
        """Stop the consumer (leaving the group, unless static membership keeps its place), the
        sink's producers and the probe, each within ``close_timeout_s``: a broker gone away must
        not hold the pod past its grace period, and nothing is left to commit by now."""
        for name, closing in (("consumer", self.consumer.stop), ("producer", self.sink.stop),
                              ("probe", self.probe.stop)):
            try:
                await asyncio.wait_for(closing(), self.settings.close_timeout_s)
            except TimeoutError:
                log.warning("closing the Kafka %s took over %.0fs (SHELFMATCH_CLOSE_TIMEOUT_S); exiting without it",
                            name, self.settings.close_timeout_s)

    async def _follow_planograms(self, tg: asyncio.TaskGroup) -> asyncio.Task[None] | None:
        """Start reading the planogram topic, if there is one, and wait (up to planogram_wait_s)
        until what it held at start is applied, so the first photos meet their planograms."""
        settings = self.settings
        if settings.planogram_topic is None:
            return None
        up_to_date = asyncio.Event()
        source = TopicPlanograms(settings.planogram_topic, consumer_config(settings))
        task = tg.create_task(self.planograms.follow(source, up_to_date), name="planograms")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(up_to_date.wait()), settings.planogram_wait_s)
        if not up_to_date.is_set():
            log.warning("planogram topic %s not read to its end after %.0fs; consuming meanwhile",
                        settings.planogram_topic, settings.planogram_wait_s)
        return task

    def close(self) -> None:
        self.pools.shutdown()
        self.http.shutdown()

    async def _tick(self) -> None:
        """Proves the event loop alive for /healthz (and logs a stall of the decode or model stage
        once); follows whether the input topic exists (not
        ready while it does not: a misspelt topic would otherwise look healthy); samples GPU
        memory for the dashboard."""
        topic = self.settings.input_topic
        started, warned, stalled = time.monotonic(), False, False
        while True:
            self.health.last_tick = time.monotonic()
            stuck = self.watchdog.stuck()
            if bool(stuck) != stalled:
                stalled = bool(stuck)
                if stuck:
                    log.error("pipeline stalled: %s running for %.0fs (SHELFMATCH_STALL_TIMEOUT_S %.0fs); /healthz "
                              "fails so that the pod is restarted", stuck[0][0], stuck[0][1], self.watchdog.bound_s)
                else:
                    log.info("pipeline progressing again")
            found = self.consumer.partitions_for_topic(topic) is not None
            if found and warned:
                log.info("input topic %s found", topic)
                warned = False
            elif not found and not warned and self.health.last_tick - started > TOPIC_GRACE_S:
                log.warning("input topic %s does not exist (SHELFMATCH_INPUT_TOPIC); not ready until it does "
                            "(create it with `shelfmatch topics create`; it is seen within %.0fs)",
                            topic, METADATA_MAX_AGE_MS / 1000)
                warned = True
            if found != self.health.input_found:
                self.health.set(input_found=found)
            if self.device.type == "cuda":
                self.metrics.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(self.device))
                self.metrics.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(self.device))
            await asyncio.sleep(1.0)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of a group, nested groups (a TaskGroup inside a TaskGroup) flattened."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def check_kafka(settings: Settings) -> None:
    """Fail fast, before the model loads, when the brokers cannot be reached or hide the input
    topic from this principal."""
    try:
        await check_input_readable(settings, kafka_security(settings))
    except KafkaConnectionError as exc:
        # aiokafka's bootstrap logs each broker's own error (refused, TLS, SASL) and raises only this.
        raise ConfigurationError(
            f"cannot connect to Kafka at {settings.kafka_bootstrap_servers} (SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS; "
            f"security {settings.security_protocol}): {exc}. If the address is right, check "
            "SHELFMATCH_SECURITY_PROTOCOL, the SASL user and password, SHELFMATCH_SSL_CAFILE and, where the "
            "brokers require client certificates, SHELFMATCH_SSL_CERTFILE and SHELFMATCH_SSL_KEYFILE "
            "(the broker's answer is logged above)"
        ) from exc


async def serve(settings: Settings, registry: CollectorRegistry | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; return the process exit code. A ConfigurationError
    is raised to the caller (the CLI prints it in one line, exit 2)."""
    try:
        service = await Service.build(settings, registry or CollectorRegistry())
    except (ConfigurationError, CatalogError):
        raise
    except Exception as exc:  # e.g. the brokers refuse our credentials
        log.error("fatal error; stopping before consuming anything", exc_info=exc)
        if (hint := missing_acl(exc, settings)) is not None:
            log.error(hint)
        return 1
    try:
        return await service.run()
    finally:
        service.close()
