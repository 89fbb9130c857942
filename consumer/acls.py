"""The least privilege the service needs on a cluster with an authorizer, and what a denial means.

:func:`required_acls` is the documented minimum (README, "Access control"), and the set the
least-privilege tests grant: with exactly these the service works in its delivery mode; the
broker's authorizer refusing any one of them is reported by :func:`missing_acl` as the ACL to add.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from consumer.settings import Settings

AUTHORIZATION_ERRORS = (
    TopicAuthorizationFailedError, GroupAuthorizationFailedError, TransactionalIdAuthorizationFailed,
    ClusterAuthorizationFailedError,
)


@dataclass(frozen=True)
class Acl:
    """One ALLOW ACL for the service's principal (from any host)."""

    operation: Literal["READ", "WRITE", "IDEMPOTENT_WRITE"]
    resource_type: Literal["TOPIC", "GROUP", "TRANSACTIONAL_ID", "CLUSTER"]
    name: str
    pattern: Literal["LITERAL", "PREFIXED"] = "LITERAL"
    why: str = ""

    def describe(self) -> str:
        prefixed = " (prefixed)" if self.pattern == "PREFIXED" else ""
        return f"{self.operation} on {self.resource_type} {self.name!r}{prefixed}"


def transactional_id_prefix(settings: Settings) -> str:
    """Every transactional id of exactly-once mode starts so (see consumer.transactions)."""
    return f"shelfmatch.{settings.group_id}.{settings.input_topic}."


def required_acls(settings: Settings) -> list[Acl]:
    """The ACLs the service's principal needs in ``settings.delivery`` mode, and nothing more.

    READ implies DESCRIBE (metadata, offsets, coordinator lookup) and WRITE implies DESCRIBE; since
    Kafka 3.0 (KIP-679) WRITE on a topic also allows an idempotent producer's InitProducerId, so no
    CLUSTER ACL is needed (brokers before 3.0 need IDEMPOTENT_WRITE on the cluster too)."""
    acls = [
        Acl("READ", "TOPIC", settings.input_topic, why="fetch photos"),
        Acl("READ", "GROUP", settings.group_id, why="join the group, commit and read offsets"),
        Acl("WRITE", "TOPIC", settings.output_topic, why="publish events"),
        Acl("WRITE", "TOPIC", settings.dlq_topic, why="publish dead letters"),
    ]
    if settings.delivery == "exactly-once":
        acls.append(Acl("WRITE", "TRANSACTIONAL_ID", transactional_id_prefix(settings), "PREFIXED",
                        why="one transactional producer per input partition"))
    return acls


def _topics(exc: TopicAuthorizationFailedError) -> list[str]:
    """The topics an aiokafka authorization error names (a topic, or a set of them)."""
    named = exc.args[0] if exc.args else None
    if isinstance(named, (set, frozenset, list, tuple)):
        return sorted(str(t) for t in named)
    return [named] if isinstance(named, str) else []


def missing_acl(
    exc: BaseException, settings: Settings | None = None, *, writing: bool = False, topic: str | None = None,
) -> str | None:
    """A line naming the ACL that the broker refused (None when ``exc`` is no authorization error).

    ``writing``: the error came from publishing; ``topic``: the topic of the failed send, when the
    caller knows it (aiokafka's error does not always name it)."""
    if not isinstance(exc, AUTHORIZATION_ERRORS):
        return None
    if isinstance(exc, TopicAuthorizationFailedError):
        names = [topic] if topic else _topics(exc)
        if writing:
            operation = "WRITE"
        elif settings is not None and settings.input_topic in names:
            operation = "READ"
        else:
            operation = "READ or WRITE"
        wanted = f"{operation} on TOPIC {', '.join(repr(n) for n in names) or '(not named)'}"
    elif isinstance(exc, GroupAuthorizationFailedError):
        wanted = f"READ on GROUP {settings.group_id!r}" if settings else "READ on the consumer group"
    elif isinstance(exc, TransactionalIdAuthorizationFailed):
        prefix = transactional_id_prefix(settings) if settings else "shelfmatch.<group>.<input topic>."
        wanted = f"WRITE on TRANSACTIONAL_ID {prefix!r} (prefixed)"
    else:
        wanted = "IDEMPOTENT_WRITE on CLUSTER (brokers before Kafka 3.0)"
    who = f"User:{settings.sasl_username}" if settings and settings.sasl_username else "this client's principal"
    return f"not authorized ({type(exc).__name__}): {who} lacks the ACL {wanted}; grant it (README, Access control)"


async def check_input_readable(settings: Settings, security: dict) -> None:
    """Raise TopicAuthorizationFailedError at start when the broker hides the input topic from this
    principal. Without DESCRIBE (implied by READ) aiokafka's group assigns no partition and logs
    only a warning, so a service without the ACL would idle and look healthy; a topic that does
    not exist yet is left to the consumer (it starts consuming once the topic is created)."""
    client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id=settings.client_id,
                            **security)
    try:
        await client.bootstrap()
        client.add_topic(settings.input_topic)
        await client.force_metadata_update()
        if settings.input_topic in client.cluster.unauthorized_topics:
            raise TopicAuthorizationFailedError(settings.input_topic)
    finally:
        await client.close()
