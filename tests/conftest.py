from __future__ import annotations

from pathlib import Path

import pytest

from catalog.build import build_catalog, references_from_folder
from catalog.store import Catalog
from tests.kafka import Broker
from tests.photos import REFERENCES


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
