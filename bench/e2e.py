"""End-to-end benchmark of the real service against the local broker, with its baselines.

For each backbone, photo size and CPU execution (torch eager, today's path; OpenVINO at its
``auto`` precision, bf16 where the CPU has it and it measured faster than fp32; OpenVINO with fp32
forced, as on a CPU without bf16), measured in the same run on the same machine:

- model alone: the embedder on pre-decoded uint8 tensors at the service's batch size, the best of
  three rounds before the service starts and three after it has stopped (its network stays loaded
  in this process meanwhile, idle);
- service, maximum: a backlog of photos drained by `shelfmatch consume` (from the first event to the
  last, without the first batch's events: see ``rate_of``);
- naive reference consumer (bench/naive_consumer.py): one message at a time;
- service at offered loads (fractions of its maximum): end-to-end latency p50/p95/p99 from the
  input record's timestamp to the event's publish timestamp;
- peak resident memory of the service;
- the cores used by the service, the broker and this process (the load producer and the event
  collector) between the first and the last event of each phase, from CPU times sampled every 50 ms:
  on this machine all three share the same cores.

    .venv/bin/python bench/e2e.py [--models efficientnet_lite0,resnet18] [--sizes store,fullhd]
        [--executions eager,openvino,openvino:fp32]

Weights are `none` (seeded random): speed does not depend on them. Results go to
out/bench/e2e.json; bench/report.py turns them into docs/performance.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "out" / "bench"
NETWORKS = OUT / "networks"  # networks converted for OpenVINO, shared by every run
BATCH = 32

from catalog.build import build_catalog, references_from_folder  # noqa: E402
from catalog.embedder import Embedder  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.preprocess import decode  # noqa: E402


def store_photos() -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "data" / "grocery-demo" / "photos").glob("*/*.jpg"))]


def shelf_frames(n: int = 12) -> list[bytes]:
    """1920x1080 JPEGs that look like shelves: rows of coloured boxes, texture noise."""
    frames = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = Image.new("RGB", (1920, 1080), (225, 225, 220))
        draw = ImageDraw.Draw(img)
        for row in range(4):
            y = 40 + row * 260
            x = 20
            while x < 1880:
                w = int(rng.integers(80, 220))
                draw.rectangle([x, y, x + w, y + 220], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
                x += w + int(rng.integers(5, 20))
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (1080, 1920, 3))
        buf = __import__("io").BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def parse_model(spec: str) -> tuple[str, tuple[int, ...]]:
    """``efficientnet_lite0`` or, for a catalogue at joined input sizes, ``efficientnet_lite0@224+320``."""
    name, _, sizes = spec.partition("@")
    return name, tuple(int(size) for size in sizes.split("+")) if sizes else ()


def slug(spec: str) -> str:
    """A model spec as it may appear in a topic's or a file's name."""
    return spec.replace("@", "-").replace("+", "_")


class ModelAlone:
    """The embedder on pre-decoded batches of the photos, at the service's batch size, built once so
    that it can be measured both before the service starts and after it has stopped."""

    def __init__(self, model: str, photos: list[bytes], execution: str, precision: str) -> None:
        name, scales = parse_model(model)
        self.embedder = Embedder(load_backbone(name, weights="none", scales=scales), "cpu", execution=execution,
                                 precision=precision, cache_dir=NETWORKS)
        self.pixels = torch.stack([decode(photos[i % len(photos)], self.embedder.input_size).pixels
                                   for i in range(BATCH)])
        for _ in range(3):  # warm-up
            self.embedder.embed(self.pixels)

    def rate(self, batches: int = 10, rounds: int = 3) -> float:
        """The best of ``rounds`` rounds of as many batches as the service's default backlog (320
        photos): this machine's noise only ever slows a round down, and a low figure here would
        flatter the service's share of it."""
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(batches):
                self.embedder.embed(self.pixels)
            best = max(best, batches * BATCH / (time.perf_counter() - start))
        return best


async def create(bootstrap: str, *topics: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        await admin.close()


async def send(bootstrap: str, topic: str, photos: list[bytes], n: int, rate: float | None = None,
               headers: list[tuple[str, bytes]] | None = None) -> None:
    """n photos, as fast as possible or paced at ``rate`` per second (open loop), each with ``headers``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024, linger_ms=5)
    await producer.start()
    try:
        start = time.monotonic()
        futures = []
        for i in range(n):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the offered load
            futures.append(await producer.send(topic, photos[i % len(photos)], key=f"cam-{i % 8}".encode(),
                                               headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def collect(bootstrap: str, topic: str, n: int, timeout_s: float = 900) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    records = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(records)}/{n} events on {topic}")
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


def rate_of(records: list, *, first: int = BATCH) -> float:
    """Events/s from their timestamps: the events after the ``first`` earliest, over the time from the
    first event to the last. A service publishes each input batch's events together (under
    exactly-once, one transaction per partition), so the window opens only once the first batch is
    done: counting that batch's events in it would credit one batch too many (a backlog of 8 batches
    read as 8 in the time of 7, 1.14x). Under a backlog the first batch is full, ``BATCH`` photos;
    the naive consumer publishes one at a time (``first=1``)."""
    stamps = sorted(r.timestamp for r in records)
    if len(stamps) <= first or stamps[-1] == stamps[0]:
        raise ValueError(f"{len(stamps)} events, the first {first} left out: no rate can be read from them")
    return (len(stamps) - first) / ((stamps[-1] - stamps[0]) / 1000)


class Service:
    def __init__(
        self, bootstrap: str, catalog: Path, topic: str, out: str, group: str, execution: str, precision: str,
        **extra: str,
    ) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "SHELFMATCH_CATALOG": str(catalog),
               "SHELFMATCH_INPUT_TOPIC": topic, "SHELFMATCH_OUTPUT_TOPIC": out, "SHELFMATCH_DLQ_TOPIC": out + ".dlq",
               "SHELFMATCH_GROUP_ID": group, "SHELFMATCH_METRICS_HOST": "127.0.0.1",
               "SHELFMATCH_METRICS_PORT": str(self.port), "SHELFMATCH_DEVICE": "cpu",
               "SHELFMATCH_BATCH_SIZE": str(BATCH), "SHELFMATCH_LOG_LEVEL": "WARNING",
               "SHELFMATCH_EXECUTION": execution, "SHELFMATCH_PRECISION": precision,
               "SHELFMATCH_NETWORK_CACHE": str(NETWORKS),
               "SHELFMATCH_THRESHOLD": "0.7",  # the benchmark measures speed, not verdicts
               **extra}
        self.proc = subprocess.Popen([sys.executable, "-m", "consumer.cli", "consume"], env=env, cwd=ROOT)
        self.cpu = CpuSampler({"service": self.proc.pid, "broker": broker_pid(), "bench": os.getpid()})
        self.cpu.start()
        self.peak_rss = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("service not ready")

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, psutil.Process(self.proc.pid).memory_info().rss)

    def batch_service_s(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read().decode()

        def value(name: str) -> float:
            line = next(ln for ln in text.splitlines() if ln.startswith(name))
            return float(line.split()[-1])

        total = sum(value(f'shelfmatch_stage_latency_seconds_sum{{stage="{s}"}}') for s in ("embed", "match"))
        return total / max(value('shelfmatch_stage_latency_seconds_count{stage="embed"}'), 1)

    def stop(self) -> None:
        self.cpu.done.set()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


BROKER_STATE = ROOT / ".cache" / "kafka" / "bench.json"
BROKER_PID: int | None = None  # set by start_broker() when it started the local broker; None for an outside one
BROKER_ENV = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(BROKER_STATE)}


def broker_pid() -> int | None:
    return BROKER_PID


def start_broker() -> str:
    """Start the local broker (scripts/kafka-local), remember its pid; its bootstrap address."""
    out = subprocess.run([str(ROOT / "scripts" / "kafka-local"), "start"], env=BROKER_ENV, check=True,
                         stdout=subprocess.PIPE, text=True)
    global BROKER_PID
    BROKER_PID = json.loads(BROKER_STATE.read_text()).get("pid")
    return out.stdout.strip().splitlines()[-1]


def stop_broker() -> None:
    subprocess.run([str(ROOT / "scripts" / "kafka-local"), "stop"], env=BROKER_ENV, check=False)


def demo_catalog(model: str) -> Path:
    """The catalogue of the demo references for ``model`` (weights ``none``), built at first use."""
    catalog = OUT / f"catalog-{slug(model)}.safetensors"
    if not catalog.exists():
        name, scales = parse_model(model)
        build_catalog(references_from_folder(ROOT / "data" / "grocery-demo" / "references"), model=name,
                      weights="none", device="cpu", progress=False, scales=scales).save(catalog)
    return catalog


class CpuSampler(threading.Thread):
    """CPU times of the service, the broker and this process (the load producer and the event
    collector) every 50 ms from the service's start, so that the cores each used can be read for
    any window afterwards: the backlog drains while the service becomes ready, before a phase could
    open one. On this machine all three share the same cores."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        super().__init__(daemon=True)
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            if pid:
                with contextlib.suppress(psutil.Error):
                    self.procs[name] = psutil.Process(pid)
        self.samples: list[tuple[float, dict[str, float | None]]] = []
        self.done = threading.Event()

    @staticmethod
    def _cpu(proc: psutil.Process) -> float | None:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited: its share is unknown, not zero
            return None
        return t.user + t.system + t.children_user + t.children_system

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), {name: self._cpu(p) for name, p in self.procs.items()}))
            self.done.wait(0.05)

    def shares(self, start: float, end: float) -> dict[str, float]:
        """Cores used between the wall-clock times ``start`` and ``end`` (the samples around them)."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        (t0, cpu0), (t1, cpu1) = before[-1], after[0]
        if t1 <= t0:
            return {}
        return {name: (c1 - c0) / (t1 - t0) for name, c1 in cpu1.items()
                if c1 is not None and (c0 := cpu0.get(name)) is not None}


def event_window(records: list) -> tuple[float, float]:
    """The first and last event's timestamps, in seconds."""
    stamps = [r.timestamp / 1000 for r in records]
    return min(stamps), max(stamps)


async def watch(service: Service, task: asyncio.Task) -> list:
    while not task.done():
        service.sample()
        await asyncio.wait({task}, timeout=0.25)
    return task.result()


def bench(bootstrap: str, model: str, size: str, photos: list[bytes], spec: str, args) -> dict:
    execution, _, precision = spec.partition(":")
    precision = precision or "auto"
    run = f"{slug(model)}-{size}-{execution}-{precision}-{os.urandom(3).hex()}"
    catalog = demo_catalog(model)
    result = {"model": model, "size": size, "batch_size": BATCH, "photo_bytes": int(np.mean([len(p) for p in photos])),
              "execution": execution, "precision": precision}
    alone = ModelAlone(model, photos, execution, precision)
    # What `auto` resolved to here; the service reads the same record in the same network cache.
    result["resolved_precision"] = alone.embedder.precision
    if (choice := alone.embedder.precision_choice) is not None:  # measured now, or read from an earlier run's record
        result["precision_choice"] = {"img_s": choice.img_s, "measured_now": choice.measured_now}
    before = alone.rate()

    # Maximum: drain a backlog.
    topic, out = f"bench.in.{run}", f"bench.out.{run}"
    asyncio.run(create(bootstrap, topic, out, out + ".dlq"))
    asyncio.run(send(bootstrap, topic, photos, args.photos))
    service = Service(bootstrap, catalog, topic, out, f"g-{run}", execution, precision)

    async def drain():
        return await watch(service, asyncio.create_task(collect(bootstrap, out, args.photos)))

    drained = asyncio.run(drain())
    result["service_img_s"] = rate_of(drained)
    result["drain_cpu_cores"] = service.cpu.shares(*event_window(drained))
    result["batch_service_s"] = service.batch_service_s()
    result["service_peak_rss_mb"] = service.peak_rss / 1e6
    print(f"[{run}] service max: {result['service_img_s']:.1f} img/s, cores used: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["drain_cpu_cores"].items()), flush=True)

    # Latency at offered loads, on the same service (fresh offsets for each phase).
    result["loads"] = []
    for fraction in args.loads:
        rate = fraction * result["service_img_s"]
        n = max(BATCH, int(rate * args.load_seconds))
        start_count = args.photos + sum(load["photos"] for load in result["loads"])

        async def phase(start_count: int = start_count, n: int = n, rate: float = rate) -> list:
            consume = asyncio.create_task(collect(bootstrap, out, start_count + n))
            await send(bootstrap, topic, photos, n, rate=rate)
            return await watch(service, consume)

        records = asyncio.run(phase())[start_count:]
        shares = service.cpu.shares(*event_window(records))
        lat = []
        for r in records:
            event = json.loads(r.value)
            lat.append(r.timestamp - event["source"]["timestamp_ms"])
        lat = np.array(lat)
        result["loads"].append({"fraction": fraction, "offered_img_s": rate, "photos": n,
                                "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                                "p99_ms": float(np.percentile(lat, 99)), "cpu_cores": shares})
        print(f"[{run}] load {fraction:.0%}: p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, "
              f"cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()), flush=True)
    result["service_peak_rss_mb"] = service.peak_rss / 1e6
    service.stop()
    # The model alone again, with the service gone, its best of both sides kept: the machine's speed
    # drifts over minutes, and a figure from one side only could catch a slow spell the drain did not.
    after = alone.rate()
    result["model_alone_img_s"] = max(before, after)
    result["model_alone_runs_img_s"] = [before, after]
    print(f"[{run}] model alone: {before:.1f} before the service, {after:.1f} after", flush=True)
    return result


def naive(bootstrap: str, model: str, size: str, photos: list[bytes], args) -> float:
    run = f"{slug(model)}-{size}-{os.urandom(3).hex()}"
    catalog = demo_catalog(model)
    # Naive reference consumer on its own backlog.
    ntopic, nout = f"bench.naive.{run}", f"bench.naive.out.{run}"
    asyncio.run(create(bootstrap, ntopic, nout))
    asyncio.run(send(bootstrap, ntopic, photos, args.naive_photos))
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "naive_consumer.py"), "--bootstrap", bootstrap,
                             "--input", ntopic, "--output", nout, "--group", f"naive-{run}", "--catalog", str(catalog),
                             "--count", str(args.naive_photos)], cwd=ROOT, stdout=subprocess.DEVNULL)
    rate = rate_of(asyncio.run(collect(bootstrap, nout, args.naive_photos)), first=1)
    proc.wait(120)
    print(f"[{run}] naive: {rate:.1f} img/s", flush=True)
    return rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet_lite0,resnet18",
                   help="backbones, each NAME or NAME@SIZE+SIZE for a catalogue at joined input sizes")
    p.add_argument("--out", default=str(OUT / "e2e.json"), help="results file (bench/report.py reads e2e.json)")
    p.add_argument("--sizes", default="store,fullhd")
    p.add_argument("--photos", type=int, default=320, help="backlog drained for the maximum")
    p.add_argument("--naive-photos", type=int, default=64)
    p.add_argument("--loads", default="0.25,0.5,0.75,1.0")
    p.add_argument("--load-seconds", type=float, default=15)
    p.add_argument("--executions", default="eager,openvino,openvino:fp32",
                   help="CPU executions side by side, EXECUTION[:PRECISION] (precision default auto)")
    args = p.parse_args()
    args.loads = [float(x) for x in args.loads.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    bootstrap = os.environ.get("SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS")
    started = not bootstrap
    if started:
        bootstrap = start_broker()
    sizes = {"store": store_photos, "fullhd": shelf_frames}
    results = []
    try:
        for size in args.sizes.split(","):
            photos = sizes[size]()
            for model in args.models.split(","):
                rows = [bench(bootstrap, model, size, photos, spec, args) for spec in args.executions.split(",")]
                rate = naive(bootstrap, model, size, photos, args)
                results += [{**row, "naive_img_s": rate} for row in rows]
    finally:
        if started:
            stop_broker()
    import openvino as ov

    from catalog.runtime import native_bf16

    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    model_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                       if ln.startswith("model name")), "")
    machine = {"cpu": model_name or platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))),
               "native_bf16": native_bf16(), "openvino": ov.get_version(),
               "load_average": os.getloadavg()[0],
               "torch_threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"),
               "command": shlex.join([".venv/bin/python", "bench/e2e.py", *sys.argv[1:]]),
               "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip()}
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
