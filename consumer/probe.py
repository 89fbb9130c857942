"""The output side's half of readiness: are the output and dead-letter topics there to publish to?

Before the first batch nothing has been published, and on an idle input topic nothing may be for
hours; readiness still has to say whether this pod could publish. :class:`OutputProbe` asks the
brokers' metadata (one request per :data:`PROBE_EVERY_S`) whether both topics exist, have a
leader for some partition and are visible to this principal. It cannot prove the WRITE ACL
(only a write can, and a probe record would be a fake event on a topic others read): that shows
with the first batch, through ``Health.publishing``. See :mod:`consumer.health`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from consumer.health import Health

log = logging.getLogger(__name__)

PROBE_EVERY_S = 5.0


class OutputProbe:
    """Metadata of the topics this member publishes to; ``start``/``stop`` like aiokafka's clients."""

    def __init__(self, topics: tuple[str, ...], client_kwargs: dict[str, Any], timeout_s: float) -> None:
        self.topics = topics
        self._client = AIOKafkaClient(**client_kwargs)
        self._timeout_s = timeout_s
        self._started = False

    async def start(self) -> None:
        await self._client.bootstrap()
        for topic in self.topics:
            self._client.add_topic(topic)
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._client.close()

    async def missing(self) -> dict[str, str] | None:
        """Each topic that cannot be published to now, with why; None when the brokers did not
        answer in time (nothing is known then: the caller keeps what it knew)."""
        try:
            updated = await asyncio.wait_for(self._client.force_metadata_update(), self._timeout_s)
        except (TimeoutError, KafkaError):  # brokers away: publishing itself will say so
            return None
        if not updated:
            return None
        cluster = self._client.cluster
        found: dict[str, str] = {}
        for topic in self.topics:
            if topic in cluster.unauthorized_topics:
                found[topic] = "not authorized (no DESCRIBE or WRITE ACL for this principal)"
            elif cluster.partitions_for_topic(topic) is None:
                found[topic] = "does not exist"
            elif not cluster.available_partitions_for_topic(topic):
                found[topic] = "has no partition with a leader"
        return found

    async def run(self, health: Health, every_s: float = PROBE_EVERY_S) -> None:
        """Keep ``health.output_found`` current, logging each change once."""
        said: dict[str, str] = {}
        while True:
            missing = await self.missing()
            if missing is not None:
                for topic, why in missing.items():
                    if said.get(topic) != why:
                        log.warning("output topic %s %s; not ready until it can be published to", topic, why)
                for topic in said.keys() - missing.keys():
                    log.info("output topic %s found", topic)
                said = missing
                if health.output_found != (not missing):
                    health.set(output_found=not missing)
            await asyncio.sleep(every_s)
