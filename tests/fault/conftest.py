"""Fault-injection harness: streams of small photos, a verifier, and a record of every run.

Each scenario sends photos to a fresh input topic, injects its fault while the service runs,
then compares the set of input (topic, partition, offset) with the ``event_id``s found on the
output topic. The figures go to ``out/reliability/results.json``; ``scripts/reliability_report.py``
turns them into ``docs/reliability.md``.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from catalog.build import build_catalog, references_from_folder
from tests.kafka import read_all
from tests.photos import encode

RESULTS = Path(__file__).resolve().parents[2] / "out" / "reliability" / "results.json"


@dataclass
class Verdict:
    scenario: str
    sent: int
    lost: int
    duplicated: int
    seconds: float
    recovery_s: float | None = None
    notes: dict = field(default_factory=dict)


def small_photo(i: int) -> bytes:
    """A 96x96 JPEG; colour varies so values differ, decoding stays cheap."""
    return encode(Image.new("RGB", (96, 96), (i * 37 % 256, i * 91 % 256, i * 53 % 256)), "JPEG", quality=80)


async def verify(
    bootstrap: str, output: str, sent, isolation_level: str = "read_uncommitted"
) -> tuple[int, int, Counter]:
    """(lost, duplicated, counts) of input photos against the events on ``output``."""
    records = await read_all(bootstrap, output, isolation_level=isolation_level)
    counts = Counter(json.loads(r.value)["event_id"] for r in records)
    expected = {s.event_id for s in sent}
    lost = len(expected - set(counts))
    duplicated = sum(c - 1 for c in counts.values())
    assert set(counts) <= expected, "events for photos that were never sent"
    return lost, duplicated, counts


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not reached within {timeout_s}s")


@pytest.fixture(scope="session")
def fast_catalog(tmp_path_factory) -> Path:
    """MobileNetV3-Small with seeded random weights: delivery tests need speed, not meaning."""
    refs = tmp_path_factory.mktemp("refs")
    for sku in range(4):
        (refs / f"sku-{sku}").mkdir()
        (refs / f"sku-{sku}" / "a.jpg").write_bytes(small_photo(sku * 11))
    catalog = build_catalog(
        references_from_folder(refs), model="mobilenet_v3_small", weights="none", device="cpu", progress=False
    )
    path = tmp_path_factory.mktemp("catalog") / "fast.safetensors"
    catalog.save(path)
    return path


@pytest.fixture(scope="session")
def reliability_log():
    verdicts: list[Verdict] = []
    yield verdicts
    if verdicts:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        previous.update({v.scenario: asdict(v) for v in verdicts})
        RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
