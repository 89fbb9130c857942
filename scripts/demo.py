"""`make demo`: the whole product once, for real, on this machine.

1. build a catalogue from data/grocery-demo/references with the chosen backbone;
2. start the local Apache Kafka broker (unless SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS names one);
3. create the topics and start `shelfmatch consume` as its own process;
4. stream the 50 store photos of data/grocery-demo/photos (plus two broken ones) with camera
   keys and headers, as a shelf camera would;
5. read one event per photo from the output topic, print them with the true product,
   accuracy and latency; show what reached the dead-letter topic;
6. SIGTERM the service (it drains and commits);
7. planogram compliance (scripts/compliance_demo.py): composed shelf frames and their planograms
   through a second service, a per-slot table and a PNG per frame with regions coloured by status;
8. stop everything the demo started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "grocery-demo"
OUT = ROOT / "out" / "demo"
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
TIMEOUT_S = 300


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def build_catalog(model: str, weights: str) -> Path:
    path = OUT / f"catalog-{model}.safetensors"
    subprocess.run(
        [sys.executable, "-m", "consumer.cli", "catalog", "build", "--images", str(DATA / "references"),
         "--model", model, "--weights", weights, "--out", str(path)],
        check=True,
    )
    return path


def start_broker() -> tuple[str, dict | None]:
    external = os.environ.get("SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        print(f"using the broker at {external}")
        return external, None
    env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(ROOT / ".cache" / "kafka" / "demo.json")}
    out = subprocess.run([str(KAFKA_LOCAL), "start"], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1], env


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, parts, 1) for name, parts in topics.items()])
    finally:
        await admin.close()


async def stream_photos(bootstrap: str, topic: str) -> dict[str, str]:
    """Send every demo photo and two broken ones; return event_id -> true SKU (or the file name)."""
    photos = sorted(DATA.glob("photos/*/*.jpg"))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    truth: dict[str, str] = {}
    try:
        futures = []
        for i, path in enumerate(photos):
            camera = f"store-12-cam-{i % 6:02d}"
            headers = [
                ("camera-id", camera.encode()), ("store-id", b"store-12"), ("shelf-id", f"aisle-{i % 3 + 1}".encode()),
                ("captured-at", datetime.now(UTC).isoformat().encode()), ("content-type", b"image/jpeg"),
            ]
            futures.append(
                (path.parent.name, await producer.send(topic, path.read_bytes(), key=camera.encode(), headers=headers))
            )
        broken = photos[0].read_bytes()
        futures.append(("(empty message)", await producer.send(topic, b"", key=b"store-12-cam-99")))
        futures.append(
            ("(truncated JPEG)", await producer.send(topic, broken[: len(broken) // 3], key=b"store-12-cam-99"))
        )
        for sku, fut in futures:
            meta = await fut
            truth[f"{meta.topic}/{meta.partition}/{meta.offset}"] = sku
    finally:
        await producer.stop()
    return truth


async def read_events(bootstrap: str, output: str, dlq: str, expected: int) -> tuple[dict, list]:
    consumer = AIOKafkaConsumer(output, dlq, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    events: dict[str, dict] = {}
    dead: list = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(events) + len(dead) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(events)} events and {len(dead)} dead letters after {TIMEOUT_S}s")
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for r in records:
                    if tp.topic == dlq:
                        dead.append(r)
                    else:
                        e = json.loads(r.value)
                        e["_published_ms"] = r.timestamp
                        events[e["event_id"]] = e
    finally:
        await consumer.stop()
    return events, dead


def report(events: dict, dead: list, truth: dict[str, str]) -> None:
    rows = sorted(events.values(), key=lambda e: (truth[e["event_id"]], e["source"]["offset"]))
    print(f"{'photo (event_id)':<26} {'camera':<18} {'true product':<26} {'best match':<26} {'score':>6}  verdict")
    for e in rows:
        true = truth[e["event_id"]]
        mark = "" if e["best"]["sku"] == true else "  <- wrong"
        print(
            f"{e['event_id'].split('.', 1)[-1]:<26} {e['photo']['camera_id']:<18} {true:<26} "
            f"{e['best']['sku']:<26} {e['best']['score']:6.3f}  {e['verdict']}{mark}"
        )
    correct = sum(e["best"]["sku"] == truth[e["event_id"]] for e in rows)
    verdicts = {v: sum(e["verdict"] == v for e in rows) for v in ("match", "ambiguous", "unknown")}
    confident = [e for e in rows if e["verdict"] == "match"]
    right_when_match = sum(e["best"]["sku"] == truth[e["event_id"]] for e in confident)
    print(f"\ntop-1 accuracy: {correct}/{len(rows)} = {correct / len(rows):.0%}")
    print(f"verdicts: {verdicts}; precision of 'match': {right_when_match}/{len(confident)}")
    e2e = np.array([e["_published_ms"] - e["source"]["timestamp_ms"] for e in rows])
    pipeline = np.array([e["latency_ms"]["pipeline"] for e in rows])
    print(
        f"end-to-end latency (input record timestamp -> event published), ms: "
        f"p50 {np.percentile(e2e, 50):.0f}  p95 {np.percentile(e2e, 95):.0f}  p99 {np.percentile(e2e, 99):.0f}"
    )
    print(
        f"in-service latency (fetched -> event built), ms: "
        f"p50 {np.percentile(pipeline, 50):.0f}  p95 {np.percentile(pipeline, 95):.0f}  "
        f"p99 {np.percentile(pipeline, 99):.0f}"
    )
    print(f"\ndead-letter topic: {len(dead)} records")
    for r in dead:
        h = dict(r.headers)
        print(
            f"  offset {h['dlq-source-offset'].decode()}: {h['dlq-reason'].decode()} - {h['dlq-error'].decode()[:80]}"
        )
    sample = OUT / "sample-event.json"
    first = {k: v for k, v in rows[0].items() if not k.startswith("_")}
    sample.write_text(json.dumps(first, indent=2) + "\n")
    print(f"\none event in full: {sample}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(service: subprocess.Popen, port: int) -> None:
    """Poll /readyz so that latency figures measure the service, not its start-up."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"shelfmatch consume exited with code {service.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    print(f"ready: metrics at http://127.0.0.1:{port}/metrics")
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("shelfmatch consume did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument(
        "--threshold",
        default="0.70",
        help="similarity threshold for 'match' (EfficientNet-Lite0 scores sit lower than ResNet's)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # aiokafka's retry chatter while new topics elect leaders
    OUT.mkdir(parents=True, exist_ok=True)

    step(f"1/6 building the catalogue with {args.model}")
    catalog = build_catalog(args.model, args.weights)

    step("2/6 starting Apache Kafka")
    bootstrap, broker_env = start_broker()
    service = None
    try:
        run = uuid.uuid4().hex[:6]
        port = free_port()
        topics = {
            "input": f"shelf.photos.demo-{run}",
            "output": f"shelf.matches.demo-{run}",
            "dlq": f"shelf.photos.dlq.demo-{run}",
        }
        asyncio.run(create_topics(bootstrap, {topics["input"]: 3, topics["output"]: 1, topics["dlq"]: 1}))

        step("3/6 starting shelfmatch consume")
        env = {
            **os.environ,
            "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "SHELFMATCH_CATALOG": str(catalog),
            "SHELFMATCH_INPUT_TOPIC": topics["input"],
            "SHELFMATCH_OUTPUT_TOPIC": topics["output"],
            "SHELFMATCH_DLQ_TOPIC": topics["dlq"],
            "SHELFMATCH_GROUP_ID": f"shelfmatch-demo-{run}",
            "SHELFMATCH_THRESHOLD": args.threshold,
            "SHELFMATCH_METRICS_HOST": "127.0.0.1",
            "SHELFMATCH_METRICS_PORT": str(port),
            "SHELFMATCH_LOG_LEVEL": "WARNING",
        }
        service = subprocess.Popen([sys.executable, "-m", "consumer.cli", "consume"], env=env)
        wait_ready(service, port)

        step("4/6 streaming 50 shelf photos and 2 broken messages")
        truth = asyncio.run(stream_photos(bootstrap, topics["input"]))
        events, dead = asyncio.run(read_events(bootstrap, topics["output"], topics["dlq"], len(truth)))

        step("5/6 results")
        report(events, dead, truth)
        service.send_signal(signal.SIGTERM)
        code = service.wait(60)
        print(f"\nshelfmatch consume stopped on SIGTERM with exit code {code}")
        if code:
            return code

        step("6/6 planogram compliance: composed shelf frames against their planograms")

        def start_service(overrides: dict[str, str]):
            nonlocal service
            service = subprocess.Popen([sys.executable, "-m", "consumer.cli", "consume"], env={**env, **overrides})
            wait_ready(service, port)

            def stop() -> int:
                assert service is not None
                service.send_signal(signal.SIGTERM)
                return service.wait(60)
            return stop

        from compliance_demo import run as compliance
        code = compliance(bootstrap, catalog, OUT, DATA / "photos", run, start_service)
        print(f"\nshelfmatch consume (compliance) stopped on SIGTERM with exit code {code}")
        return code
    finally:
        if service and service.poll() is None:
            service.kill()
        if broker_env is not None:
            subprocess.run([str(KAFKA_LOCAL), "stop"], env=broker_env, check=False)


if __name__ == "__main__":
    sys.exit(main())
