"""Every metric the service exports, built against a registry that the caller passes in."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from catalog.planogram import PlanogramReason
from consumer.messages import FACING_STATUSES

# Why a planogram record was refused: the model's own reasons, and the record's key naming
# another camera than its body (consumer.planograms).
PLANOGRAM_REJECTIONS = (*(r.value for r in PlanogramReason), "camera-mismatch")

# Seconds, from a few ms (one photo's decode) to an hour: a backlog drained after an outage, as long
# as the lag and no-events alerts let one build up. histogram_quantile never reads above the top bucket,
# so every latency an alert names (prometheusRule.alerts.latencyP99) must lie below it.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512, 1024)
STAGES = ("decode", "batch_wait", "embed", "match", "publish", "commit")
# What a changed catalogue file led to (consumer/watcher.py). Only `swapped` changes the catalogue.
# Every result of consumer.watcher.SwapResult, exported at 0 so that the first of each is an increase.
SWAP_RESULTS = ("swapped", "unchanged", "invalid", "missing", "other_model", "uncalibrated", "no_memory", "failed")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.end_to_end = Histogram(
            "shelfmatch_end_to_end_latency_seconds",
            "From the input record's Kafka timestamp to the broker acknowledging its event",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.stage = Histogram(
            "shelfmatch_stage_latency_seconds",
            "Time per pipeline stage (decode and batch_wait per photo; embed, match, publish, commit per batch)",
            ["stage"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "shelfmatch_batch_size", "Photos per micro-batch", buckets=BATCH_BUCKETS, registry=registry
        )
        self.photos = Counter(
            "shelfmatch_photos", "Input photos handled, by outcome (matched or dead_lettered)",
            ["outcome"], registry=registry,
        )
        self.verdicts = Counter(
            "shelfmatch_verdicts", "Match events published, by verdict", ["verdict"], registry=registry
        )
        self.dead_letters = Counter(
            "shelfmatch_dead_letters", "Records sent to the dead-letter topic, by reason", ["reason"], registry=registry
        )
        self.publish_retries = Counter(
            "shelfmatch_publish_retries",
            "Publish attempts that failed, or were still unacknowledged after the publish timeout",
            registry=registry,
        )
        self.commit_failures = Counter(
            "shelfmatch_commit_failures", "Offset commits refused (usually a rebalance)", registry=registry
        )
        self.lag = Gauge(
            "shelfmatch_consumer_lag_records", "High watermark minus the next offset to fetch",
            ["topic", "partition"], registry=registry,
        )
        self.in_flight = Gauge(
            "shelfmatch_in_flight_photos", "Photos fetched but not yet committed", registry=registry
        )
        self.catalog_info = Gauge(
            "shelfmatch_catalog_info", "The catalogue in use (value 1)", ["version", "model"], registry=registry
        )
        self.catalog_products = Gauge(
            "shelfmatch_catalog_products", "Products in the catalogue in use", registry=registry
        )
        self.catalog_references = Gauge(
            "shelfmatch_catalog_references", "Reference vectors (matrix rows) in the catalogue in use",
            registry=registry,
        )
        self.catalog_device_bytes = Gauge(
            "shelfmatch_catalog_device_bytes", "Bytes the catalogue in use holds on the model's device",
            registry=registry,
        )
        self.catalog_swaps = Counter(
            "shelfmatch_catalog_swaps",
            "Changes of the catalogue file handled, by result: swapped, unchanged (same version), invalid "
            "(unreadable, corrupt, half-written), missing, other_model and no_memory (refused), failed",
            ["result"], registry=registry,
        )
        self.catalog_swap_seconds = Histogram(
            "shelfmatch_catalog_swap_seconds",
            "From a changed catalogue file seen to the new catalogue serving: load, checks, upload, warm-up",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._catalog_labels: tuple[str, str] | None = None
        self.unreadable_batches = Counter(
            "shelfmatch_unreadable_batches",
            "Record batches of the input that could not be read (a codec missing here, a failed CRC)",
            ["topic"], registry=registry,
        )
        self.ready = Gauge("shelfmatch_ready", "1 when the service is consuming and publishing", registry=registry)
        self.pipeline_stalled = Gauge(
            "shelfmatch_pipeline_stalled",
            "1 while a batch's decoding or model call has run longer than SHELFMATCH_STALL_TIMEOUT_S "
            "(/healthz fails then), else 0",
            registry=registry,
        )
        self.assignments = Counter(
            "shelfmatch_partition_assignments",
            "Partition assignments this member received (one per rebalance it took part in)", registry=registry,
        )
        self.device_decode_fallbacks = Counter(
            "shelfmatch_device_decode_fallbacks",
            "plain JPEGs the device decoder refused or could not resize, decoded by Pillow instead",
            registry=registry,
        )
        # Both label sets are closed: the four facing statuses, and catalog.planogram.PlanogramReason.
        self.facings = Counter(
            "shelfmatch_facings",
            "Facings in acknowledged compliance events, by status (ok, wrong-product, empty, unknown)",
            ["status"], registry=registry,
        )
        self.planogram_rejections = Counter(
            "shelfmatch_planogram_rejections",
            "Planogram records refused (the previous planogram stays in force), by reason",
            ["reason"], registry=registry,
        )
        self.planograms = Gauge(
            "shelfmatch_planograms", "Cameras with a planogram in force", registry=registry)
        self.gpu_memory = Gauge(
            "shelfmatch_gpu_memory_bytes", "CUDA memory of this process", ["kind"], registry=registry)
        for stage in STAGES:
            self.stage.labels(stage)
        for outcome in ("matched", "dead_lettered"):
            self.photos.labels(outcome)
        for result in SWAP_RESULTS:
            self.catalog_swaps.labels(result)
        for status in FACING_STATUSES:
            self.facings.labels(status)
        for reason in PLANOGRAM_REJECTIONS:
            self.planogram_rejections.labels(reason)

    def catalog_serving(self, *, version: str, model: str, products: int, references: int, device_bytes: int) -> None:
        """Describe the catalogue now in use; ``shelfmatch_catalog_info`` keeps only its label set."""
        if self._catalog_labels is not None and self._catalog_labels != (version, model):
            self.catalog_info.remove(*self._catalog_labels)
        self._catalog_labels = (version, model)
        self.catalog_info.labels(version, model).set(1)
        self.catalog_products.set(products)
        self.catalog_references.set(references)
        self.catalog_device_bytes.set(device_bytes)
