from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from catalog.build import build_catalog, references_from_folder
from catalog.store import Catalog
from tests.kafka import Broker, create_topics, unique
from tests.photos import REFERENCES
from tests.service import Service


@pytest.fixture(scope="session")
def broker():
    """A real Apache Kafka broker: $SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS, or one started for this session."""
    b = Broker.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def grocery_catalog(tmp_path_factory) -> tuple[Catalog, Path]:
    """The demo catalogue (10 products, packshot + 8 store photos each) with ImageNet EfficientNet-Lite0."""
    catalog = build_catalog(
        references_from_folder(REFERENCES), model="efficientnet_lite0", device="cpu", progress=False
    )
    path = tmp_path_factory.mktemp("catalog") / "grocery.safetensors"
    catalog.save(path)
    return catalog, path


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    partitions: int
    group: str


@pytest.fixture
async def topics(broker) -> Topics:
    t = Topics(unique("photos"), unique("matches"), unique("dlq"), partitions=3, group=unique("group"))
    await create_topics(broker.bootstrap, t.input, partitions=t.partitions)
    await create_topics(broker.bootstrap, t.output, t.dlq, partitions=1)
    return t


@pytest.fixture
def service(broker, grocery_catalog, topics, tmp_path, request):
    """Factory of consumer processes wired to this test's topics; all are killed at teardown."""
    started: list[Service] = []

    def make(**overrides: str) -> Service:
        settings = {
            "SHELFMATCH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "SHELFMATCH_GROUP_ID": topics.group,
            "SHELFMATCH_INPUT_TOPIC": topics.input,
            "SHELFMATCH_OUTPUT_TOPIC": topics.output,
            "SHELFMATCH_DLQ_TOPIC": topics.dlq,
            "SHELFMATCH_CATALOG": str(grocery_catalog[1]),
            "SHELFMATCH_BATCH_SIZE": "8",
            "SHELFMATCH_BATCH_MAX_WAIT_MS": "50",
            "SHELFMATCH_THRESHOLD": "0.7",
            "SHELFMATCH_SESSION_TIMEOUT_MS": "6000",
            **overrides,
        }
        svc = Service(settings, tmp_path / f"service-{len(started)}.log")
        started.append(svc)
        return svc.start()

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for svc in started:
        svc.close()
        if failed:
            print(f"--- {svc.log_path.name} ---\n{svc.log()}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
