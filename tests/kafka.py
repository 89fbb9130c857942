"""The real broker for integration tests, and small clients to feed and read its topics."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"


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
    headers: list[list[tuple[str, bytes]]] | None = None,
) -> list[Sent]:
    """Send every value and return where each landed (acknowledged by the broker)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024, acks="all")
    await producer.start()
    try:
        futures = []
        for i, value in enumerate(values):
            key = keys[i] if keys else None
            hdrs = headers[i] if headers else []
            futures.append(await producer.send(topic, value, key=key, headers=hdrs))
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [
        Sent(m.topic, m.partition, m.offset, keys[i] if keys else None, tuple(headers[i]) if headers else ())
        for i, m in enumerate(metas)
    ]


async def read_until(
    bootstrap: str, topic: str, done, *, timeout_s: float = 120.0, isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord]:
    """Read ``topic`` from the start until ``done(records)`` is true; fail after ``timeout_s``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False, isolation_level=isolation_level,
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
