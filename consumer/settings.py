"""Every setting of the service, read once from ``SHELFMATCH_*`` variables (or CLI flags).

One frozen object is built at the entry point and passed down; nothing else reads the
environment. Each field is also a ``shelfmatch consume`` flag: ``batch_size`` is
``SHELFMATCH_BATCH_SIZE`` and ``--batch-size``; a flag wins over the variable.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup"), *, request_millicores: int | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the container's CPU quota (cgroup
    v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), which ``os.cpu_count()`` ignores: a pod limited
    to 2 CPUs on a 64-core node would otherwise start 64 decode threads and 64 torch threads.

    Without a quota (no CPU limit, the usual way to run CPU pods) the pod's CPU request, when
    given (``request_millicores``, from the downward API), caps it instead, rounded up: a pod
    that asked for 1500m gets 2 threads, not one per core of the node it landed on."""
    cpus = len(os.sched_getaffinity(0))
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            if period_file is None:
                quota, period = (cgroup / quota_file).read_text().split()[:2]
            else:
                quota, period = (cgroup / quota_file).read_text().strip(), (cgroup / period_file).read_text().strip()
            if quota in ("max", "-1"):
                break
            return max(1, min(cpus, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    if request_millicores:  # 0: the downward API's answer for a pod that requested no CPU
        return max(1, min(cpus, math.ceil(request_millicores / 1000)))
    return cpus


REBALANCE_MARGIN_MS = 30_000  # beyond the drain: the join itself and the assignment's round trip


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHELFMATCH_", frozen=True, extra="forbid")

    # Kafka
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated")
    group_id: str = Field("shelfmatch", description="consumer group id")
    client_id: str = Field("shelfmatch", description="client id reported to the brokers")
    input_topic: str = Field("shelf.photos", description="topic of encoded shelf photos")
    output_topic: str = Field("shelf.matches", description="topic of JSON MatchEvents")
    dlq_topic: str = Field("shelf.photos.dlq", description="dead-letter topic for unusable photos")
    session_timeout_ms: int = Field(30_000, ge=1_000, description="consumer group session timeout")
    heartbeat_interval_ms: int = Field(
        3_000, ge=100,
        description="heartbeat interval of the group member (at most a third of the session timeout); a member "
        "learns of a rebalance at its next heartbeat, so partitions given up wait this long for their new owner",
    )
    rebalance_timeout_ms: int | None = Field(
        None, ge=1_000,
        description="how long the group waits for every member to rejoin in a rebalance; it must exceed the "
        "drain before partitions are given up (default: SHELFMATCH_SHUTDOWN_TIMEOUT_S + 30 s)",
    )
    group_instance_id: str | None = Field(
        None, min_length=1,
        description="static group membership (KIP-345): a member restarted with the same id within the session "
        "timeout gets its partitions back with no rebalance; needs a name stable across restarts (a "
        "StatefulSet pod's; a Deployment pod's name changes on every restart)",
    )
    max_poll_interval_ms: int = Field(
        300_000, ge=1_000, description="longest gap between polls before the group evicts us"
    )
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description="at-least-once | exactly-once (Kafka transactions; read the output with read_committed)",
    )
    publish_timeout_ms: int = Field(
        30_000,
        ge=100,
        description="how long a publish may wait for acknowledgements before readiness drops; "
        "also the request and commit timeout",
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "zstd", description="codec of the output and dead-letter producers: none | gzip | snappy | lz4 | zstd "
        "(input in any of these is read, whatever this says)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism"
    )
    sasl_username: str | None = Field(None, description="SASL user")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers' certificates")
    ssl_certfile: Path | None = Field(
        None, description="client certificate (PEM, with its chain) for mutual TLS; needs SHELFMATCH_SSL_KEYFILE")
    ssl_keyfile: Path | None = Field(None, description="private key (PEM, unencrypted) of that client certificate")

    # Matching
    catalog: Path = Field(Path("catalog.safetensors"), description="catalogue file built by `shelfmatch catalog build`")
    catalog_poll_s: float = Field(
        10.0, ge=0.0, le=3600.0,
        description="seconds between checks of the catalogue file for a new version, swapped in without a "
        "restart (0: read once at start)",
    )
    weights: str | None = Field(
        None,
        description="weights source override (imagenet | none | PATH); must reproduce the catalogue's fingerprint",
    )
    threshold: float | None = Field(
        None, ge=-1.0, le=1.0,
        description="similarity threshold; default: the catalogue's calibration (an uncalibrated catalogue needs it)"
    )
    min_margin: float | None = Field(
        None, ge=0.0, le=2.0, description="least gap between best and second product; default: the calibration's"
    )
    top_k: int = Field(5, ge=1, le=100, description="candidates per event")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto (bf16 on a GPU, and with openvino on a CPU that has native bf16 where it "
        "measured faster than fp32 at first start; else fp32) | fp32 | bf16"
    )
    execution: Literal["auto", "eager", "cuda-graph", "compile", "openvino"] = Field(
        "auto",
        description="auto (cuda-graph on a GPU, openvino on a CPU) | eager (torch) | cuda-graph "
        "| compile (torch.compile at start) | openvino (CPU only)",
    )
    network_cache: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shelfmatch",
        description="folder where the network converted for OpenVINO is kept, keyed by the catalogue's fingerprint, "
        "and what auto precision measured on this CPU",
    )
    jpeg_decoder: Literal["auto", "pillow", "device"] = Field(
        "auto", description="auto (device = nvJPEG on a GPU, pillow on a CPU) | pillow | device"
    )

    # Planogram compliance (consumer/planograms.py, consumer/facings.py)
    planograms: Path | None = Field(
        None, description="JSON file of planograms (an array, one per camera) read at start; for small sites")
    planogram_topic: str | None = Field(
        None, description="compacted topic of planograms keyed by camera id, read whole by every replica; "
        "a change applies without a restart, a tombstone removes the camera's planogram")
    planogram_wait_s: float = Field(
        60.0, ge=0.0, description="longest wait at start for the planogram topic to be read to its end")
    frame_max_side: int = Field(
        1600, ge=64, le=16384, description="a photo with regions is decoded with its longer side at most this many "
        "pixels before its facings are cut (memory: 3 bytes a pixel per photo in flight)")

    # Batching and input limits
    batch_size: int = Field(32, ge=1, le=1024, description="images per micro-batch: whole photos, or facings")
    batch_max_wait_ms: int = Field(50, ge=0, le=60_000, description="longest wait to fill a batch")
    max_message_bytes: int = Field(10 * 1024 * 1024, ge=1, description="larger photos go to the dead-letter topic")
    max_image_pixels: int = Field(64_000_000, ge=1, description="larger images are treated as decompression bombs")
    allowed_formats: Annotated[tuple[str, ...], NoDecode] = Field(
        ("JPEG", "PNG", "WEBP"), description="comma-separated image formats"
    )
    cpu_request_millicores: int | None = Field(
        None, ge=0,
        description="the pod's CPU request in millicores (the chart fills it from the downward API); with no CPU "
        "limit it sizes the decode pool and the torch threads (default: the CPU quota, else the CPUs in the "
        "affinity mask)",
    )
    decode_workers: int = Field(
        default_factory=lambda data: available_cpus(request_millicores=data.get("cpu_request_millicores")), ge=1,
        description="threads decoding photos (default: the CPUs this pod may use, see "
        "SHELFMATCH_CPU_REQUEST_MILLICORES)",
    )
    on_unreadable_batch: Literal["dead-letter", "stop"] = Field(
        "dead-letter",
        description="dead-letter | stop: a record batch this process cannot read (a codec missing, a failed CRC) "
        "becomes one unreadable-batch dead letter naming its offsets, or stops the service with exit 1",
    )

    # Operations
    metrics_host: str = Field("0.0.0.0", description="address of the /metrics /healthz /readyz server")
    metrics_port: int = Field(9400, ge=0, le=65535, description="its port (0 picks a free one)")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="longest drain on SIGTERM, and before partitions move in a rebalance"
    )
    close_timeout_s: float = Field(
        10.0, gt=0, le=300,
        description="longest wait for the Kafka consumer and producer to close after the drain",
    )
    stall_timeout_s: float = Field(
        120.0, gt=0,
        description="/healthz fails when one batch's decoding or model call has run this long (a hung model "
        "or decoder); publish stalls never count. The default is above the slowest plausible batch: 1024 "
        "photos through ResNet-50 on 4 CPU cores take about 100 s, a GPU batch well under 1 s",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG | INFO | WARNING | ERROR"
    )

    @property
    def compression_type(self) -> str | None:
        """``compression`` as aiokafka's producers take it (``None`` for no compression).

        The default, zstd, was measured on MatchEvents (bench/compression.py, docs/performance.md):
        13-19% of their size at 8-32 events per record batch, for 2-4 µs of CPU per event; gzip
        compresses as well for 3-6 times the CPU, snappy and lz4 leave 18-29%."""
        return None if self.compression == "none" else self.compression

    @property
    def heartbeat_interval(self) -> int:
        """Milliseconds between heartbeats: the setting, capped at a third of the session timeout."""
        return max(100, min(self.heartbeat_interval_ms, self.session_timeout_ms // 3))

    @property
    def rebalance_timeout(self) -> int:
        """Milliseconds the group waits for members to rejoin: above the drain that runs before a
        member rejoins (aiokafka's default, the session timeout, equals the 30 s drain)."""
        return self.rebalance_timeout_ms or int(self.shutdown_timeout_s * 1000) + REBALANCE_MARGIN_MS

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        return tuple(v.upper() for v in value)

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
        unknown = set(value) - known
        if unknown or not value:
            raise ValueError(f"allowed formats must be among {sorted(known)}, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if len({self.input_topic, self.output_topic, self.dlq_topic}) != 3:
            raise ValueError("input, output and dead-letter topics must all differ")
        if self.rebalance_timeout_ms is not None and self.rebalance_timeout_ms <= self.shutdown_timeout_s * 1000:
            raise ValueError(
                f"SHELFMATCH_REBALANCE_TIMEOUT_MS ({self.rebalance_timeout_ms}) must exceed the drain "
                f"SHELFMATCH_SHUTDOWN_TIMEOUT_S ({self.shutdown_timeout_s:g} s), or the group moves on without "
                "members still draining")
        if self.planogram_topic in (self.input_topic, self.output_topic, self.dlq_topic):
            raise ValueError("the planogram topic must differ from the input, output and dead-letter topics")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"{self.security_protocol} needs SHELFMATCH_SASL_USERNAME and SHELFMATCH_SASL_PASSWORD")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("a client certificate needs both SHELFMATCH_SSL_CERTFILE and SHELFMATCH_SSL_KEYFILE")
        if self.ssl_certfile and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"a client certificate (SHELFMATCH_SSL_CERTFILE) is only sent over TLS; "
                             f"SHELFMATCH_SECURITY_PROTOCOL is {self.security_protocol}, not SSL or SASL_SSL")
        return self


ENV_PREFIX = "SHELFMATCH_"


def variable(field: str) -> str:
    """The environment variable of a settings field: ``batch_size`` -> ``SHELFMATCH_BATCH_SIZE``."""
    return f"{ENV_PREFIX}{field.upper()}"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``SHELFMATCH_*`` variables that name no setting (a typo is otherwise ignored silently).
    Variables of the tooling around the service (the local broker, the tests) are not settings."""
    known = {variable(name) for name in Settings.model_fields}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known and k not in TOOLING_VARIABLES)


# Read by scripts/kafka-local and the test suite, never by the service.
TOOLING_VARIABLES = frozenset({"SHELFMATCH_KAFKA_STATE", "SHELFMATCH_KAFKA_CACHE", "SHELFMATCH_KAFKA_START_TIMEOUT_S"})


def explain(error: ValidationError) -> str:
    """One line per invalid setting, named as the operator sets it (variable and flag)."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        if field in Settings.model_fields:
            name = f"{variable(field)} (--{field.replace('_', '-')})"
        else:
            name = field or "settings"
        value = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"{name}: {item['msg']}{value}")
    return "; ".join(lines)
