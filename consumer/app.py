"""Process entry of ``shelfmatch consume``: model, Kafka clients, HTTP endpoints, signals."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import torch
from aiokafka import AIOKafkaConsumer
from aiokafka.helpers import create_ssl_context
from prometheus_client import CollectorRegistry, make_wsgi_app

from catalog.embedder import Embedder, resolve_device
from catalog.errors import FingerprintMismatchError
from catalog.jpeg_batch import JpegBatchDecoder
from catalog.matcher import Matcher
from catalog.models import backbone_of
from catalog.preprocess import DecodeLimits
from catalog.store import Catalog
from consumer.acls import check_input_readable, missing_acl
from consumer.metrics import Metrics
from consumer.pipeline import DrainOnRevoke, Model, Topics, run_pipeline
from consumer.settings import Settings, available_cpus
from consumer.sink import Health, Sink
from consumer.transactions import TransactionalSink
from consumer.source import InFlight

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.85  # lowest threshold the research studied; calibrate per catalogue instead
HEALTH_STALE_S = 30.0  # /healthz fails if the event loop has not ticked for this long


def kafka_security(settings: Settings) -> dict:
    """aiokafka keyword arguments for the configured security protocol (secrets never logged)."""
    kwargs: dict = {"security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = create_ssl_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    if settings.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return kwargs


def load_model(settings: Settings, catalog: Catalog, device: torch.device) -> Model:
    """Rebuild the catalogue's model and refuse to run if it does not reproduce the fingerprint."""
    source = settings.weights or catalog.weights_source
    backbone = backbone_of(catalog.fingerprint, source, catalog.head())
    if backbone.fingerprint != catalog.fingerprint:
        raise FingerprintMismatchError(
            f"catalogue {settings.catalog} was built with {catalog.fingerprint.describe()} but weights "
            f"{source!r} give {backbone.fingerprint.describe()}; rebuild the catalogue or point "
            f"SHELFMATCH_WEIGHTS at the weights it was built with"
        )
    calibration = catalog.calibration
    threshold = settings.threshold
    if threshold is None:
        threshold = calibration.threshold if calibration else DEFAULT_THRESHOLD
    min_margin = settings.min_margin
    if min_margin is None:
        min_margin = calibration.min_margin if calibration else 0.0
    embedder = Embedder(backbone, device, precision=settings.precision, execution=settings.execution,
                        batch_size=settings.batch_size)
    matcher = Matcher(catalog, device=device, top_k=settings.top_k, threshold=threshold, min_margin=min_margin)
    on_device = settings.jpeg_decoder == "device" or (settings.jpeg_decoder == "auto" and device.type == "cuda")
    return Model(embedder, matcher, catalog, JpegBatchDecoder(device) if on_device else None)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def start_http(settings: Settings, registry: CollectorRegistry, health: Health) -> WSGIServer:
    """Serve /metrics, /healthz (event loop alive) and /readyz (consuming and publishing)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok = time.monotonic() - health.last_tick < HEALTH_STALE_S
        elif path == "/readyz":
            ok = health.ready
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ok\n" if ok else b"not ok\n"]

    server = make_server(settings.metrics_host, settings.metrics_port, app, _ThreadingWSGIServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.server_port)
    return server


async def _tick(health: Health, metrics: Metrics, device: torch.device) -> None:
    """Proves the event loop alive for /healthz; samples GPU memory for the dashboard."""
    while True:
        health.last_tick = time.monotonic()
        if device.type == "cuda":
            metrics.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(device))
            metrics.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(device))
        await asyncio.sleep(1.0)


async def serve(settings: Settings, registry: CollectorRegistry | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; return the process exit code."""
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(metrics.ready)
    catalog = Catalog.load(settings.catalog)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        # Shapes are fixed (batch size, input size): let cuDNN pick its fastest kernels once.
        torch.backends.cudnn.benchmark = True
    elif torch.get_num_threads() > (cpus := available_cpus()):
        # torch counts the node's cores, not the container's CPU quota: more threads only throttle.
        log.info("torch CPU threads: %d -> %d (the CPUs this process may use)", torch.get_num_threads(), cpus)
        torch.set_num_threads(cpus)
    model = load_model(settings, catalog, device)
    metrics.catalog_info.labels(catalog.version, catalog.fingerprint.backbone).set(1)
    metrics.catalog_products.set(len(catalog.skus))
    decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")
    device_pool = ThreadPoolExecutor(1, thread_name_prefix="device-decode")
    # Warm up on the thread that will run the model (compiled CUDA graphs are per thread).
    warmup_s = await asyncio.get_running_loop().run_in_executor(model_pool, model.warm_up)
    log.info(
        "catalogue %s: %d products, %s on %s (%s, warm-up %.1fs, JPEG decoding: %s), threshold %.3f, min margin %.3f",
        catalog.version, len(catalog.skus), catalog.fingerprint.describe(), device, model.embedder.describe(),
        warmup_s, "device" if model.jpeg_decoder else "pillow", model.matcher.threshold, model.matcher.min_margin,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = start_http(settings, registry, health)
    security = kafka_security(settings)
    limits = DecodeLimits(
        max_bytes=settings.max_message_bytes, max_pixels=settings.max_image_pixels,
        formats=settings.allowed_formats,
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=settings.group_id,
        client_id=settings.client_id, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed", session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(300, settings.session_timeout_ms // 3),
        max_poll_interval_ms=settings.max_poll_interval_ms,
        # A record larger than one partition's fetch is skipped by aiokafka with only a log
        # line; allow the largest photo we accept (plus headers) so it reaches the DLQ instead.
        # The whole fetch is held no larger than that too: fetched data waits in memory until the
        # pipeline takes it, so a bigger fetch only grows memory on a backlog, not throughput.
        max_partition_fetch_bytes=settings.max_message_bytes + 1024 * 1024,
        fetch_max_bytes=settings.max_message_bytes + 1024 * 1024,
        **security,
    )
    producer_kwargs = dict(
        bootstrap_servers=settings.kafka_bootstrap_servers, client_id=settings.client_id,
        enable_idempotence=True, acks="all", max_request_size=settings.max_message_bytes + 1024 * 1024,
        request_timeout_ms=settings.publish_timeout_ms, compression_type=settings.compression_type,
        **security,
    )
    if settings.delivery == "exactly-once":
        sink = TransactionalSink(producer_kwargs, settings.group_id, metrics, health, consumer.assignment)
    else:
        sink = Sink(producer_kwargs, consumer, metrics, health, timeout_s=settings.publish_timeout_ms / 1000)
    in_flight = InFlight(metrics)
    listener = DrainOnRevoke(in_flight, settings.shutdown_timeout_s, metrics, sink)
    ticker = asyncio.create_task(_tick(health, metrics, device), name="tick")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    code = 0
    try:
        await check_input_readable(settings, security)
        await sink.start()
        await consumer.start()
        consumer.subscribe([settings.input_topic], listener=listener)
        health.set(consuming=True)
        log.info("consuming %s as group %s (%s)", settings.input_topic, settings.group_id, settings.delivery)
        pipeline = asyncio.create_task(run_pipeline(
            consumer, sink, model=model,
            topics=Topics(output=settings.output_topic, dead_letter=settings.dlq_topic),
            decode_pool=decode_pool, model_pool=model_pool, device_pool=device_pool, limits=limits, batch_size=settings.batch_size,
            batch_max_wait_s=settings.batch_max_wait_ms / 1000, in_flight=in_flight, metrics=metrics, stop=stop,
            poll_every_s=settings.max_poll_interval_ms / 3000,
        ), name="pipeline")
        await asyncio.wait({pipeline, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not pipeline.done():
            log.info("stopping: draining %d in-flight photos", in_flight.count)
            try:
                await asyncio.wait_for(asyncio.shield(pipeline), settings.shutdown_timeout_s)
            except TimeoutError:
                log.error("drain did not finish in %.0fs; uncommitted photos will be re-read", settings.shutdown_timeout_s)
                pipeline.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pipeline
                code = 1
        if pipeline.done() and not pipeline.cancelled() and pipeline.exception() is not None:
            raise pipeline.exception()
    except Exception as exc:
        log.exception("fatal error; stopping without committing unpublished photos")
        if (hint := missing_acl(exc, settings)) is not None:
            log.error(hint)
        code = 1
    finally:
        health.set(consuming=False)
        await consumer.stop()
        await sink.stop()
        for task in (ticker, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pool in (decode_pool, model_pool, device_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        server.shutdown()
    log.info("stopped (exit %d)", code)
    return code
