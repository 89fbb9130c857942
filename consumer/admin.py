"""``shelfmatch topics create``: the topics the service needs, made with Kafka's admin API."""
from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code

from consumer.app import RECORD_OVERHEAD_BYTES, kafka_security
from consumer.errors import ConfigurationError
from consumer.settings import Settings


async def create_topics(
    settings: Settings, *, partitions: int, replication_factor: int, retention_ms: int,
) -> list[str]:
    """Create the input, output and dead-letter topics (and the planogram topic, when one is
    set) that do not exist yet; one line each.

    The input topic gets ``partitions`` (the most consumers that can share the work); the output
    topic as many, so that events stay in per-camera order at the same parallelism; the
    dead-letter topic one. Input and dead letters are kept ``retention_ms``; every topic accepts
    records as large as the service does (``max.message.bytes``). The planogram topic is
    compacted (the latest record per camera is kept forever, tombstones a day) with one partition:
    every replica reads it whole, and it is small."""
    max_bytes = str(settings.max_message_bytes + RECORD_OVERHEAD_BYTES)  # as the service fetches and produces
    wanted = [
        (settings.input_topic, partitions, {"retention.ms": str(retention_ms), "max.message.bytes": max_bytes}),
        (settings.output_topic, partitions, {"max.message.bytes": max_bytes}),
        (settings.dlq_topic, 1, {"retention.ms": str(retention_ms), "max.message.bytes": max_bytes}),
    ]
    if settings.planogram_topic is not None:
        wanted.append((settings.planogram_topic, 1, {"cleanup.policy": "compact", "delete.retention.ms": "86400000"}))
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id=settings.client_id,
                                **kafka_security(settings))
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        raise ConfigurationError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} (SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS): {exc}"
        ) from exc
    lines = []
    try:
        existing = set(await admin.list_topics())
        for name, count, config in wanted:
            if name in existing:
                lines.append(f"{name}: exists, left as it is")
                continue
            response = await admin.create_topics([NewTopic(name, count, replication_factor, topic_configs=config)])
            _, code, *message = response.topic_errors[0]
            if code:
                error = for_code(code)
                if error is TopicAlreadyExistsError:
                    lines.append(f"{name}: exists, left as it is")
                    continue
                detail = message[0] if message else ""
                raise ConfigurationError(f"cannot create topic {name}: {error.__name__} {detail}")
            settings_text = ", ".join(f"{k}={v}" for k, v in config.items())
            lines.append(f"{name}: created, {count} partition(s), replication {replication_factor}, {settings_text}")
    finally:
        await admin.close()
    return lines
