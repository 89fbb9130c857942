"""Regions of a photo, their crops, and recognition with facings as the unit of batching."""
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from aiokafka.structs import ConsumerRecord
from PIL import Image
from prometheus_client import CollectorRegistry

from catalog.embedder import Embedder
from catalog.errors import ImageRejected
from catalog.matcher import Matcher
from catalog.models import load_backbone
from catalog.planogram import Planogram, parse_planogram
from catalog.preprocess import DecodeLimits, decode_frame, to_tensor
from catalog.store import Catalog
from consumer.facings import HEADER_BOXES, Frames, check_regions, crop, parse_boxes, regions_for
from consumer.messages import ComplianceEvent, MatchEvent
from consumer.metrics import Metrics
from consumer.pipeline import ReadyBatch, Recognizer, Topics, process
from consumer.source import DecodedPhoto, Poison, Received, decode_record
from consumer.stream import END
from tests import photos as P
from tests import shelves as S

CPU = torch.device("cpu")


def record(offset: int, value: bytes, headers=(), key: bytes = b"cam-1") -> ConsumerRecord:
    return ConsumerRecord(topic="photos", partition=0, offset=offset, timestamp=0, timestamp_type=0, key=key,
                          value=value, checksum=None, serialized_key_size=len(key), serialized_value_size=len(value),
                          headers=list(headers))


def planograms(*items: dict) -> dict[str, Planogram]:
    return {p.camera_id: p for p in (parse_planogram(json.dumps(i)) for i in items)}


@pytest.mark.parametrize(("header", "reason", "says"), [
    (b"not json", "bad-boxes", "not JSON"),
    (b"[]", "bad-boxes", "non-empty"),
    (b'[{"box": [0, 0, 1]}]', "bad-boxes", "[0]"),
    (b'[{"box": [0, 0, 0.5, 0.5], "colour": "red"}]', "bad-boxes", "[0]"),
    (b'[{"box": [0.5, 0, 1.2, 0.5]}]', "bad-region", "outside the frame"),
    (b'[{"box": [0.2, 0.3, 0.2, 0.6]}]', "bad-region", "area"),
    (b'[{"box": [0.5, 0.3, 0.4, 0.6]}]', "bad-region", "area"),
    (b"[" * 1001, "bad-boxes", "cannot be parsed"),
    (b'[{"box": [0, 0, 0.5, ' + b"9" * 5000 + b"]}]", "bad-boxes", "cannot be parsed"),
    (b'[{"box": [0, 0, 0.5, ' + b"9" * 400 + b"]}]", "bad-boxes", "beyond any number"),
])
def test_a_bad_boxes_header_names_its_fault(header, reason, says):
    with pytest.raises(ImageRejected) as err:
        parse_boxes(header)
    assert err.value.reason == reason and says in str(err.value)


def test_boxes_take_the_slot_they_overlap_and_a_planogram_alone_gives_its_slots():
    table = planograms(S.planogram("cam-1", list(S.SKUS)))
    boxes = json.dumps([{"id": "a", "box": [0.27, 0.0, 0.49, 1.0]}, {"box": [0.2, 0.0, 0.8, 1.0]}]).encode()
    from_boxes = regions_for({"camera_id": "cam-1"}, [(HEADER_BOXES, boxes)], table)
    assert from_boxes is not None and from_boxes.origin == "boxes"
    first, second = from_boxes.facings
    assert (first.box_id, first.slot, first.expected_sku) == ("a", "r0p1", S.SKUS[1])
    assert (second.slot, second.expected_sku) == (None, None)  # spans three slots: none covers half of it
    from_plan = regions_for({"camera_id": "cam-1"}, [], table)
    assert from_plan is not None and from_plan.origin == "planogram"
    assert [f.expected_sku for f in from_plan.facings] == list(S.SKUS)
    assert regions_for({"camera_id": "cam-2"}, [], table) is None  # no planogram, no boxes: whole photo


def test_a_frame_far_smaller_than_its_planogram_is_refused():
    plan = S.planogram("cam-1", list(S.SKUS))
    regions = regions_for({"camera_id": "cam-1"}, [], planograms({**plan, "frame": {"width": 4000, "height": 1000}}))
    assert regions is not None
    check_regions(regions, 1200, 300)
    with pytest.raises(ImageRejected) as err:
        check_regions(regions, 640, 160)
    assert err.value.reason == "frame-too-small"
    tiny = regions_for({"camera_id": "cam-1"}, [], planograms(plan))
    assert tiny is not None
    with pytest.raises(ImageRejected) as err:  # no frame size given: each facing needs 8 pixels a side
        check_regions(tiny, 24, 24)
    assert err.value.reason == "frame-too-small" and "r0p0" in str(err.value)


def test_a_crop_holds_the_pixels_of_its_region():
    contents = list(S.SKUS)
    frame = decode_frame(S.frame(contents), 4096).pixels
    regions = regions_for({"camera_id": "cam-1"}, [], planograms(S.planogram("cam-1", contents)))
    assert regions is not None
    crops = crop(frame, regions.facings, (96, 64))
    assert crops.shape == (4, 3, 64, 96) and crops.dtype == torch.uint8
    for i, sku in enumerate(contents):
        want = to_tensor(S.reference(sku).resize((S.FACING, S.FACING)).resize((96, 64), Image.Resampling.BILINEAR))
        error = (crops[i].float() - want.float()).abs().mean().item()
        assert error < 12, f"facing {i} differs from its photo by {error:.1f} grey levels"
        others = [(crops[i].float() - crops[j].float()).abs().mean().item() for j in range(4) if j != i]
        assert min(others) > 2 * error


def test_a_photo_with_regions_is_decoded_as_a_frame_and_one_without_as_before():
    frames = Frames(lambda: planograms(S.planogram("cam-1", list(S.SKUS))), max_side=320)
    data = S.frame(list(S.SKUS))
    framed = decode_record(record(0, data), (224, 224), DecodeLimits(), frames=frames)
    assert isinstance(framed, DecodedPhoto) and framed.regions is not None
    assert framed.pixels.shape == (3, 80, 320) and (framed.width, framed.height) == (640, 160)
    whole = decode_record(record(1, data, key=b"cam-2"), (224, 224), DecodeLimits(), frames=frames)
    assert isinstance(whole, DecodedPhoto) and whole.regions is None and whole.pixels.shape == (3, 224, 224)
    bad = decode_record(record(2, data, [(HEADER_BOXES, b"{")]), (224, 224), DecodeLimits(), frames=frames)
    assert isinstance(bad, Poison) and bad.reason == "bad-boxes"


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory) -> Recognizer:
    catalog = Catalog.load(S.build_shelf_catalog(tmp_path_factory.mktemp("shelf")))
    embedder = Embedder(load_backbone("mobilenet_v3_small", weights="none"), CPU, batch_size=8)
    return Recognizer(embedder, Matcher(catalog, device=CPU, threshold=0.5, top_k=3), catalog)


async def run_process(recognizer: Recognizer, batches: list[list[tuple[ConsumerRecord, object]]], batch_size: int):
    inq, outq = asyncio.Queue(), asyncio.Queue()
    loop = asyncio.get_running_loop()
    for batch in batches:
        received = []
        for rec, _ in batch:
            future = loop.create_future()
            received.append(Received(record=rec, arrived=0.0, decoded=future))
        await inq.put(ReadyBatch(received=received, decoded=[d for _, d in batch], closed=0.0))
    await inq.put(END)
    metrics = Metrics(CollectorRegistry())
    with ThreadPoolExecutor(1) as pool:
        await process(inq, outq, recognizer=recognizer, model_pool=pool, topics=Topics("out", "dlq"),
                      metrics=metrics, max_dead_letter_bytes=1000, batch_size=batch_size, batch_max_wait_s=0.0)
    outcomes = []
    while (o := outq.get_nowait()) is not END:
        outcomes.append(o)
    return outcomes, metrics


async def test_facings_of_a_frame_span_batches_and_make_one_event_per_photo(recognizer):
    # 12 facings: empty gaps, one misplaced product; frames on 2 rows; batches of 8 facings.
    contents = [S.SKUS[0], S.SKUS[1], None, S.SKUS[3], S.SKUS[2], S.SKUS[1],
                S.SKUS[2], S.SKUS[3], S.SKUS[0], None, S.SKUS[1], S.SKUS[0]]
    expected = [S.SKUS[0], S.SKUS[1], S.SKUS[2], S.SKUS[3], S.SKUS[2], S.SKUS[1],
                S.SKUS[2], S.SKUS[3], S.SKUS[0], S.SKUS[1], S.SKUS[2], S.SKUS[0]]
    frames = Frames(lambda: planograms(S.planogram("cam-1", expected, rows=2)))
    limits = DecodeLimits()
    shelf = decode_record(record(0, S.frame(contents, rows=2)), (224, 224), limits, frames=frames)
    whole_rec = record(1, P.encode(S.reference(S.SKUS[2]), "JPEG", quality=95), key=b"close-up")
    whole = decode_record(whole_rec, (224, 224), limits, frames=frames)
    poison = decode_record(record(2, b"junk"), (224, 224), limits, frames=frames)
    second = decode_record(record(3, S.frame(contents, rows=2)), (224, 224), limits, frames=frames)
    batches = [[(record(0, b""), shelf), (whole_rec, whole), (record(2, b"junk"), poison)], [(record(3, b""), second)]]
    outcomes, metrics = await run_process(recognizer, batches, batch_size=8)

    assert [o.photos for o in outcomes] == [3, 1]  # one outcome per input batch, in order
    first = outcomes[0].records
    assert [r.topic for r in first] == ["out", "out", "dlq"]
    event = ComplianceEvent.model_validate_json(first[0].value)
    assert event.event_id == "photos/0/0" and event.regions_from == "planogram"
    assert event.planogram is not None and event.planogram.version == "v1"
    statuses = [f.status for f in event.facings]
    assert statuses == ["ok", "ok", "empty", "ok", "ok", "ok", "ok", "ok", "ok", "empty", "wrong-product", "ok"]
    assert [f.best.sku for f in event.facings][10] == S.SKUS[1]
    assert event.summary.counts == {"ok": 9, "wrong-product": 1, "empty": 2, "unknown": 0}
    assert event.summary.compliance == 0.75
    assert sum(event.summary.share_of_shelf.values()) == pytest.approx(1.0, abs=1e-3)
    match = MatchEvent.model_validate_json(first[1].value)
    assert match.best.sku == S.SKUS[2] and match.schema_version == 1
    assert outcomes[1].offsets and ComplianceEvent.model_validate_json(outcomes[1].records[0].value).facings[2].status \
        == "empty"
    # 12 + 1 + 12 units in batches of 8: the first frame's last 4 facings share a batch with the close-up.
    assert metrics.registry.get_sample_value("shelfmatch_stage_latency_seconds_count", {"stage": "embed"}) == 4
    assert dict(first[0].facings) == {"ok": 9, "empty": 2, "wrong-product": 1}
