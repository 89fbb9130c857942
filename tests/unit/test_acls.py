from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from consumer.acls import missing_acl, required_acls
from consumer.settings import Settings


def settings(**kw) -> Settings:
    return Settings(input_topic="in", output_topic="out", dlq_topic="dlq", group_id="g", sasl_username="svc", **kw)


def test_exactly_once_adds_only_the_prefixed_transactional_id():
    alo = required_acls(settings())
    eos = required_acls(settings(delivery="exactly-once"))
    assert [(a.operation, a.resource_type, a.name) for a in alo] == [
        ("READ", "TOPIC", "in"), ("READ", "GROUP", "g"), ("WRITE", "TOPIC", "out"), ("WRITE", "TOPIC", "dlq")]
    assert eos[:4] == alo and len(eos) == 5
    assert (eos[4].resource_type, eos[4].name, eos[4].pattern) == ("TRANSACTIONAL_ID", "shelfmatch.g.in.", "PREFIXED")


def test_each_denial_names_its_acl():
    s = settings(delivery="exactly-once")
    assert "User:svc lacks the ACL READ on TOPIC 'in'" in missing_acl(TopicAuthorizationFailedError("in"), s)
    assert "WRITE on TOPIC 'dlq'" in missing_acl(TopicAuthorizationFailedError(), writing=True, topic="dlq")
    assert "WRITE on TOPIC 'out'" in missing_acl(TopicAuthorizationFailedError({"out"}), writing=True)
    assert "READ on GROUP 'g'" in missing_acl(GroupAuthorizationFailedError(), s)
    assert "TRANSACTIONAL_ID 'shelfmatch.g.in.' (prefixed)" in missing_acl(TransactionalIdAuthorizationFailed(), s)
    assert missing_acl(KafkaConnectionError(), s) is None
