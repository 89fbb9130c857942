"""Photos/s through a real broker with 1, 2, ... service processes in one consumer group.

Each configuration drains the same backlog of full-HD JPEG shelf frames from an input topic with
enough partitions for every process, with ``k`` `shelfmatch consume` processes in one group, each
pinned to its own share of the machine's CPUs (as ``k`` pods with a CPU request each would be),
all on the one GPU when there is one. Measured per configuration, in one run:

- photos/s end to end: events published per second over the middle 80% of the backlog (the
  first 10% holds warm-up and the group's joins, the last 10% the tail of the slowest member);
- CPU seconds per photo of the service processes, and of the broker, over the backlog;
- GPU utilisation (nvidia-smi, sampled every 0.5 s during the backlog) when on CUDA;
- end-to-end latency p50/p99 at an offered load of half the measured rate (input record
  timestamp to event publish timestamp);

and, beside them, the pipeline fed from memory (bench/gpu.py's stages: no fetch, publish or
commit) with the same model, device and frames, so that the cost of the broker path is a ratio
measured in the same run.

    .venv/bin/python bench/through_broker.py [--device cpu|cuda] [--model resnet18] [--processes 1,2]

Weights are `none` (seeded random): speed does not depend on them. Results: out/bench/broker.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "out" / "bench"
BATCH = 32
PARTITIONS = 12

from bench.e2e import collect, create, send, shelf_frames  # noqa: E402
from catalog.build import build_catalog, references_from_folder  # noqa: E402


def cpu_shares(processes: int) -> list[set[int]]:
    """The CPUs this run may use, split into ``processes`` disjoint sets of equal size."""
    cpus = sorted(os.sched_getaffinity(0))
    if processes > len(cpus):
        raise SystemExit(f"{processes} processes need at least as many CPUs; this machine gives {len(cpus)}")
    per = len(cpus) // processes
    return [set(cpus[i * per:(i + 1) * per]) for i in range(processes)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """``k`` service processes in one group, each pinned to its CPUs; stopped with SIGTERM."""

    def __init__(self, k: int, env: dict[str, str]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        for cpus in cpu_shares(k):
            port = free_port()
            proc_env = {**env, "SHELFMATCH_METRICS_PORT": str(port), "SHELFMATCH_DECODE_WORKERS": str(len(cpus))}
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "consume"], env=proc_env, cwd=ROOT,
                preexec_fn=lambda cpus=cpus: os.sched_setaffinity(0, cpus),
            ))
            self.ports.append(port)
        deadline = time.monotonic() + 600
        for port, proc in zip(self.ports, self.procs, strict=True):
            while not self._ready(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"a service process exited with {proc.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise TimeoutError("service processes not ready")
                time.sleep(0.2)

    @staticmethod
    def _ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.procs:
            t = psutil.Process(proc.pid).cpu_times()
            total += t.user + t.system
        return total

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(120)


class Sampler:
    """Samples, every 0.25 s while running: the fleet's CPU seconds, the broker's, and the GPU's
    utilisation (nvidia-smi, when there is one), each with its wall-clock time in ms."""

    def __init__(self, fleet: Fleet, broker_pid: int | None) -> None:
        self.fleet, self.broker_pid = fleet, broker_pid
        self.rows: list[tuple[float, float, float, float]] = []  # (ms, service CPU s, broker CPU s, GPU %)
        self._stop = threading.Event()
        self._gpu = shutil.which("nvidia-smi")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            gpu = float("nan")
            if self._gpu:
                out = subprocess.run([self._gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True)
                if out.returncode == 0 and out.stdout.strip():
                    gpu = float(out.stdout.split()[0])
            broker = float("nan")
            if self.broker_pid is not None:
                t = psutil.Process(self.broker_pid).cpu_times()
                broker = t.user + t.system
            self.rows.append((time.time() * 1000, self.fleet.cpu_seconds(), broker, gpu))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def over(self, start_ms: float, end_ms: float) -> tuple[float, float, float | None]:
        """Service CPU seconds and broker CPU seconds spent between the two times, and the mean GPU
        utilisation then (None without a GPU)."""
        ms, service, broker, gpu = (np.array(col) for col in zip(*self.rows, strict=True))
        inside = (ms >= start_ms) & (ms <= end_ms)
        gpu_mean = float(np.nanmean(gpu[inside])) if self._gpu and inside.any() else None
        return (float(np.interp(end_ms, ms, service) - np.interp(start_ms, ms, service)),
                float(np.interp(end_ms, ms, broker) - np.interp(start_ms, ms, broker)), gpu_mean)


async def stable_since(bootstrap: str, group: str, members: int, timeout_s: float = 300) -> float:
    """Wall-clock ms at which the group was first seen Stable with all its members."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            (response,) = await admin.describe_consumer_groups([group])
            _error, _group, state, _ptype, _protocol, group_members, *_ = response.groups[0]
            if state == "Stable" and len(group_members) == members:
                return time.time() * 1000
            await asyncio.sleep(0.1)  # polling the coordinator with a deadline
    finally:
        await admin.close()
    raise TimeoutError(f"group {group} not stable with {members} members")


def from_memory(model: str, device: str, frames: list[bytes], catalog: Path, photos: int, workers: int) -> float:
    """The service's stages fed from memory, as bench/gpu.py measures them, on this run's catalogue."""
    from bench.gpu import _feed_pipeline
    from catalog.embedder import Embedder, resolve_device
    from catalog.jpeg_batch import JpegBatchDecoder
    from catalog.matcher import Matcher
    from catalog.models import load_backbone
    from catalog.store import Catalog
    from consumer.pipeline import Recognizer

    dev = resolve_device(device)
    cat = Catalog.load(catalog)
    embedder = Embedder(load_backbone(model, weights="none"), dev, precision="auto", execution="auto",
                        batch_size=BATCH)
    jpeg = JpegBatchDecoder(dev) if dev.type == "cuda" else None
    recognizer = Recognizer(embedder, Matcher(cat, device=dev, threshold=0.7), cat, jpeg)
    return asyncio.run(_feed_pipeline(recognizer, frames, photos, workers, device_jpeg=jpeg is not None))


def _produce_share(bootstrap: str, topic: str, frames: list[bytes], n: int) -> None:
    asyncio.run(send(bootstrap, topic, frames, n))


def produce(bootstrap: str, topic: str, frames: list[bytes], n: int, producers: int) -> float:
    """Produce ``n`` frames from ``producers`` processes at full speed; seconds taken."""
    shares = [n // producers + (i < n % producers) for i in range(producers)]
    with ProcessPoolExecutor(producers) as pool:
        pool.submit(int).result()  # processes started before the clock does
        start = time.perf_counter()
        futures = [pool.submit(_produce_share, bootstrap, topic, frames[i:] + frames[:i], share)
                   for i, share in enumerate(shares)]
        for future in futures:
            future.result()
        return time.perf_counter() - start


def measure(k: int, args: argparse.Namespace, bootstrap: str, broker_pid: int | None, catalog: Path,
            frames: list[bytes]) -> dict:
    """One configuration: a backlog drained by ``k`` processes, then a paced load at half that rate.

    The processes start first, on the empty topic, and the backlog is produced once the group is
    Stable with all ``k`` members (the local broker has no initial rebalance delay, so each join
    is a rebalance; the joins stay out of the measurement). Producing runs in ``--producers``
    processes at full speed; if the service keeps pace with them, the figure is a lower bound and
    the row says so. The window runs from the first to the 95th percentile event, so the slowest
    member's tail stays outside it."""
    run = f"{k}p-{os.urandom(3).hex()}"
    topic, out, group = f"broker.in.{run}", f"broker.out.{run}", f"g-{run}"
    asyncio.run(create(bootstrap, topic, out, out + ".dlq", partitions=PARTITIONS))
    env = {**os.environ, "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "SHELFMATCH_CATALOG": str(catalog),
           "SHELFMATCH_INPUT_TOPIC": topic, "SHELFMATCH_OUTPUT_TOPIC": out, "SHELFMATCH_DLQ_TOPIC": out + ".dlq",
           "SHELFMATCH_GROUP_ID": group, "SHELFMATCH_METRICS_HOST": "127.0.0.1", "SHELFMATCH_DEVICE": args.device,
           "SHELFMATCH_BATCH_SIZE": str(BATCH), "SHELFMATCH_LOG_LEVEL": "WARNING",
           "SHELFMATCH_THRESHOLD": "0.7"}  # speed, not verdicts
    fleet = Fleet(k, env)
    try:
        with Sampler(fleet, broker_pid) as sampler:
            asyncio.run(stable_since(bootstrap, group, k))
            produce_s = produce(bootstrap, topic, frames, args.photos, args.producers)
            records = asyncio.run(collect(bootstrap, out, args.photos))
        stamps = np.sort([r.timestamp for r in records])
        last = int(0.95 * len(stamps)) - 1
        start_ms, end_ms = float(stamps[0]), float(stamps[last])
        photos = last
        service_cpu, broker_cpu, gpu = sampler.over(start_ms, end_ms)
        row = {
            "processes": k,
            "cpus_per_process": len(cpu_shares(k)[0]),
            "backlog": args.photos,
            "measured_photos": photos,
            "photos_s": photos / ((end_ms - start_ms) / 1000),
            "service_cpu_ms_per_photo": 1000 * service_cpu / photos,
            "broker_cpu_ms_per_photo": 1000 * broker_cpu / photos,
            "gpu_util_pct": gpu,
            "produced_photos_s": args.photos / produce_s,
        }
        row["producer_bound"] = row["photos_s"] >= 0.95 * row["produced_photos_s"]
        print(f"[{run}] {row['photos_s']:.1f} photos/s over {photos} photos, service CPU "
              f"{row['service_cpu_ms_per_photo']:.1f} ms/photo", flush=True)
        rate = 0.5 * row["photos_s"]
        n = max(BATCH * k, int(rate * args.load_seconds))

        async def paced() -> list:
            consume = asyncio.create_task(collect(bootstrap, out, args.photos + n))
            await send(bootstrap, topic, frames, n, rate=rate)
            return await consume

        lat = np.array([r.timestamp - json.loads(r.value)["source"]["timestamp_ms"]
                        for r in sorted(asyncio.run(paced()), key=lambda r: r.timestamp)[args.photos:]])
        row.update({"load_photos_s": rate, "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99))})
        print(f"[{run}] at {rate:.0f} photos/s: p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms", flush=True)
    finally:
        fleet.stop()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--photos", type=int, default=640, help="backlog per configuration")
    p.add_argument("--memory-photos", type=int, default=0, help="photos for the from-memory figure (default: --photos)")
    p.add_argument("--producers", type=int, default=1, help="processes producing the backlog")
    p.add_argument("--load-seconds", type=float, default=10)
    p.add_argument("--out", type=Path, default=OUT / "broker.json")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    frames = shelf_frames(12)
    catalog = OUT / f"catalog-{args.model}.safetensors"
    if not catalog.exists():
        build_catalog(references_from_folder(ROOT / "data" / "grocery-demo" / "references"), model=args.model,
                      weights="none", device="cpu", progress=False).save(catalog)

    bootstrap = os.environ.get("SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS")
    state = ROOT / ".cache" / "kafka" / "bench-broker.json"
    env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(state)}
    started = not bootstrap
    if started:
        done = subprocess.run([str(ROOT / "scripts" / "kafka-local"), "start"], env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
        bootstrap = done.stdout.strip().splitlines()[-1]
    broker_pid = json.loads(state.read_text()).get("pid") if started else None
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    result: dict = {"device": card, "model": args.model, "batch": BATCH, "partitions": PARTITIONS,
                    "frame_bytes": int(np.mean([len(f) for f in frames])), "cpus": len(os.sched_getaffinity(0)),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             cwd=ROOT).stdout.strip() or "unknown",
                    "rows": []}
    try:
        memory = from_memory(args.model, args.device, frames, catalog, args.memory_photos or args.photos,
                             len(os.sched_getaffinity(0)))
        result["from_memory_photos_s"] = memory
        print(f"from memory (no broker): {memory:.1f} photos/s", flush=True)
        for k in (int(x) for x in args.processes.split(",")):
            row = measure(k, args, bootstrap, broker_pid, catalog, frames)
            row["of_from_memory"] = row["photos_s"] / memory
            result["rows"].append(row)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if started:
            subprocess.run([str(ROOT / "scripts" / "kafka-local"), "stop"], env=env, check=False)
    print(f"\n{card}, {args.model}, batch {BATCH}, full-HD frames of {result['frame_bytes'] / 1e3:.0f} kB")
    print(f"from memory: {result['from_memory_photos_s']:.1f} photos/s")
    print("| processes | CPUs each | photos/s | of from-memory | produced photos/s | service CPU ms/photo "
          "| broker CPU ms/photo | GPU util % | p50 / p99 ms at 50% load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        gpu = "-" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}"
        bound = " (producer-bound: a lower bound)" if r["producer_bound"] else ""
        print(f"| {r['processes']} | {r['cpus_per_process']} | {r['photos_s']:.1f}{bound} "
              f"| {r['of_from_memory']:.2f} | {r['produced_photos_s']:.0f} | {r['service_cpu_ms_per_photo']:.1f} "
              f"| {r['broker_cpu_ms_per_photo']:.1f} | {gpu} "
              f"| {r['p50_ms']:.0f} / {r['p99_ms']:.0f} |")
    base = result["rows"][0]["photos_s"]
    for r in result["rows"][1:]:
        print(f"{r['processes']} processes / 1: {r['photos_s'] / base:.2f}x")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
