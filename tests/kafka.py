"""The real broker for integration tests, and small clients to feed and read its topics."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
JAVA_PRODUCER = ROOT / "tests" / "java" / "Produce.java"


def kafka_libs() -> Path:
    """The broker's jars as scripts/kafka-local resolved them (kafka-clients and its codecs among them)."""
    version = re.search(r"<kafka.version>(.+)</kafka.version>", (ROOT / "scripts" / "kafka" / "pom.xml").read_text())
    cache = Path(os.environ.get("SHELFMATCH_KAFKA_CACHE", ROOT / ".cache" / "kafka"))
    return cache / version.group(1) / "libs"


@dataclass
class Broker:
    bootstrap: str
    started_here: bool
    env: dict

    @classmethod
    def start(cls) -> Broker:
        """Use $SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS if set, else start a private local broker."""
        external = os.environ.get("SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS")
        if external:
            return cls(bootstrap=external, started_here=False, env={})
        env = {**os.environ, "SHELFMATCH_KAFKA_STATE": str(ROOT / ".cache" / "kafka" / f"test-{os.getpid()}.json")}
        out = subprocess.run([str(KAFKA_LOCAL), "start"], env=env, check=True, stdout=subprocess.PIPE, text=True)
        return cls(bootstrap=out.stdout.strip().splitlines()[-1], started_here=True, env=env)

    def stop(self, keep_data: bool = False) -> None:
        if self.started_here:
            args = ["stop", "--keep-data"] if keep_data else ["stop"]
            subprocess.run([str(KAFKA_LOCAL), *args], env=self.env, check=True)

    def data_dir(self) -> Path | None:
        """The broker's log.dirs, when this session started it (None for an external broker)."""
        if not self.started_here:
            return None
        return Path(json.loads(Path(self.env["SHELFMATCH_KAFKA_STATE"]).read_text())["workdir"]) / "data"

    def batch_codecs(self, topic: str, partitions: int) -> dict[int, list[str]]:
        """The compression codec of every record batch stored for ``topic``, per partition, as the
        broker's own DumpLogSegments reads its log segments."""
        data = self.data_dir()
        assert data is not None, "needs the broker this session started"
        found: dict[int, list[str]] = {}
        for p in range(partitions):
            segments = sorted(str(f) for f in (data / f"{topic}-{p}").glob("*.log"))
            if not segments:
                continue
            out = subprocess.run(["java", "-cp", f"{kafka_libs()}/*", "kafka.tools.DumpLogSegments", "--files",
                                  ",".join(segments)], check=True, capture_output=True, text=True).stdout
            found[p] = re.findall(r"compresscodec: (\w+)", out)
        return found

    def restart(self) -> None:
        """Bring a broker stopped with ``keep_data`` back, same port and data."""
        subprocess.run([str(KAFKA_LOCAL), "start"], env=self.env, check=True, stdout=subprocess.DEVNULL)


def unique(name: str) -> str:
    return f"{name}.{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, *names: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


@dataclass(frozen=True)
class Sent:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: tuple

    @property
    def event_id(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


async def produce(
    bootstrap: str, topic: str, values: list[bytes], *, keys: list[bytes | None] | None = None,
    headers: list[list[tuple[str, bytes]]] | None = None, partitions: list[int] | None = None,
) -> list[Sent]:
    """Send every value (to ``partitions[i]`` if given) and return where each landed (acknowledged)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024, acks="all")
    await producer.start()
    try:
        futures = []
        for i, value in enumerate(values):
            key = keys[i] if keys else None
            hdrs = headers[i] if headers else []
            partition = partitions[i] if partitions else None
            futures.append(await producer.send(topic, value, key=key, headers=hdrs, partition=partition))
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [
        Sent(m.topic, m.partition, m.offset, keys[i] if keys else None, tuple(headers[i]) if headers else ())
        for i, m in enumerate(metas)
    ]


def java_produce(
    bootstrap: str, topic: str, codecs: list[str], values: list[bytes], folder: Path,
) -> dict[str, list[Sent]]:
    """Send every value once per codec with the official Java producer (tests/java/Produce.java,
    ``compression.type=CODEC``, keys ``cam-<i>``); where each landed, per codec."""
    paths = []
    for i, value in enumerate(values):
        paths.append(folder / f"value-{i}.bin")
        paths[-1].write_bytes(value)
    out = subprocess.run(
        ["java", "-cp", f"{kafka_libs()}/*", str(JAVA_PRODUCER), bootstrap, topic, ",".join(codecs), *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    sent: dict[str, list[Sent]] = {c: [] for c in codecs}
    for line in out.splitlines():
        codec, partition, offset = line.split()
        i = len(sent[codec])
        key = f"cam-{i}".encode()
        sent[codec].append(Sent(topic, int(partition), int(offset), key, (("camera-id", key),)))
    assert all(len(v) == len(values) for v in sent.values()), out
    return sent


async def read_until(
    bootstrap: str,
    topic: str,
    done,
    *,
    timeout_s: float = 120.0,
    isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord]:
    """Read ``topic`` from the start until ``done(records)`` is true; fail after ``timeout_s``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met after {timeout_s}s with {len(records)} records")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def read_all(
    bootstrap: str,
    topic: str,
    partitions: int = 1,
    *,
    timeout_s: float = 60.0,
    isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord]:
    """Everything on ``topic`` up to its end offsets as of now (the last stable offsets with read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: end offsets {ends} not reached after {timeout_s}s")
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()
