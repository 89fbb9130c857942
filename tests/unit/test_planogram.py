"""Planograms as data: what validates, what is refused and with which reason, and rectification."""
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from catalog.errors import CatalogError, PlanogramError
from catalog.planogram import (
    EMPTY_SKU,
    PlanogramReason,
    Region,
    check_against_catalog,
    check_frame,
    parse_planogram,
    planogram_schema,
    rectify,
)
from catalog.preprocess import to_tensor
from tests.photos import ROOT, photo, store_photos


def slot(id: str, x0: float, y0: float, x1: float, y1: float, sku: str = "Banana", **region) -> dict:
    return {"id": id, "sku": sku, "row": 0, "position": 0,
            "region": {"x0": x0, "y0": y0, "x1": x1, "y1": y1, **region}}


def record(*slots: dict, **extra) -> dict:
    return {"camera_id": "cam-1", "version": "v7", "slots": list(slots), **extra}


def reason_of(raw) -> str:
    with pytest.raises(PlanogramError) as info:
        parse_planogram(raw, skus={"Banana", "Kiwi"})
    return info.value.reason


def test_a_valid_planogram_parses_from_json_bytes_and_keeps_its_slots():
    raw = json.dumps(record(slot("a", 0, 0, 0.5, 1), slot("b", 0.5, 0, 1, 1, sku="Kiwi"),
                            frame={"width": 1920, "height": 1080})).encode()
    p = parse_planogram(raw, skus={"Banana", "Kiwi"})
    assert p.skus() == ("Banana", "Kiwi")
    assert p.frame is not None and p.frame.width == 1920
    with pytest.raises(ValidationError):  # frozen
        p.version = "v8"  # type: ignore[misc]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", PlanogramReason.MALFORMED),
    (json.dumps({"camera_id": "cam-1"}), PlanogramReason.MALFORMED),
    (record(slot("a", 0, 0, 1.2, 1)), PlanogramReason.OUTSIDE_FRAME),
    (record(slot("a", -0.1, 0, 0.5, 1)), PlanogramReason.OUTSIDE_FRAME),
    (record(slot("a", 0.5, 0, 0.5, 1)), PlanogramReason.ZERO_AREA),
    (record(slot("a", 0.6, 0, 0.5, 1)), PlanogramReason.ZERO_AREA),
    (record(slot("a", 0, 0, 0.5, 1), slot("a", 0.5, 0, 1, 1)), PlanogramReason.DUPLICATE_SLOT),
    (record(slot("a", 0, 0, 0.6, 1), slot("b", 0.3, 0, 1, 1)), PlanogramReason.OVERLAPPING_SLOTS),
    (record(slot("a", 0, 0, 0.5, 1, sku="Durian")), PlanogramReason.UNKNOWN_SKU),
    (record(slot("a", 0, 0, 0.5, 1, sku=EMPTY_SKU)), PlanogramReason.RESERVED_SKU),
    (record(slot("a", 0, 0, 0.5, 0.5, corners=[[0, 0], [0, 0.5], [0.5, 0.5], [0.5, 0]])), PlanogramReason.BAD_CORNERS),
    (record(slot("a", 0, 0, 0.5, 0.5, corners=[[0, 0], [0.9, 0], [0.5, 0.5], [0, 0.5]])), PlanogramReason.BAD_CORNERS),
])
def test_a_planogram_that_does_not_validate_is_refused_with_its_reason(raw, reason):
    assert reason_of(raw) == reason.value


def test_reasons_are_a_bounded_set_under_the_catalog_error_root():
    with pytest.raises(CatalogError):
        parse_planogram(b"")
    assert len({r.value for r in PlanogramReason}) == len(PlanogramReason) <= 12


def test_slots_that_only_touch_or_overlap_by_a_sliver_are_accepted():
    p = parse_planogram(record(slot("a", 0, 0, 0.505, 1), slot("b", 0.5, 0, 1, 1)))
    assert [s.id for s in p.slots] == ["a", "b"]


def test_check_against_catalog_names_the_missing_skus():
    p = parse_planogram(record(slot("a", 0, 0, 0.5, 1, sku="Durian")))
    with pytest.raises(PlanogramError, match="Durian"):
        check_against_catalog(p, ["Banana"])
    check_against_catalog(p, ["Durian"])


def test_a_frame_far_smaller_than_the_planogram_expects_is_refused():
    p = parse_planogram(record(slot("a", 0, 0, 0.5, 1), frame={"width": 1920, "height": 1080}))
    check_frame(p, 960, 540)
    with pytest.raises(PlanogramError) as info:
        check_frame(p, 320, 180)
    assert info.value.reason == PlanogramReason.FRAME_TOO_SMALL.value


def test_the_json_schema_describes_slots_and_regions():
    schema = planogram_schema()
    assert set(schema["required"]) == {"camera_id", "version", "slots"}
    assert {"Slot", "Region"} <= set(schema["$defs"])
    assert schema["$defs"]["Region"]["properties"]["x0"]["maximum"] == 1.0


def test_region_pixels_stay_inside_the_frame_and_cover_one_pixel_at_least():
    assert Region(x0=0.25, y0=0.5, x1=0.75, y1=1.0).pixels(400, 200) == (100, 100, 300, 200)
    assert Region(x0=0.999, y0=0.999, x1=1.0, y1=1.0).pixels(10, 10) == (9, 9, 10, 10)


def test_rectifying_an_upright_box_gives_the_plain_crop():
    image = to_tensor(photo(store_photos()[0][0]))  # (3, 348, 348) uint8
    region = Region(x0=0.25, y0=0.25, x1=0.75, y1=0.75)
    left, top, right, bottom = region.pixels(348, 348)
    out = rectify(image, region.quad(), (bottom - top, right - left))
    assert out.dtype == torch.uint8 and out.shape == (3, bottom - top, right - left)
    assert (out.int() - image[:, top:bottom, left:right].int()).abs().max() <= 1


def test_rectifying_a_quadrilateral_undoes_a_perspective_warp():
    # A real photo squeezed into a trapezoid (as a bay seen from the side), then rectified back.
    import torchvision.transforms.functional as TF

    image = to_tensor(photo(store_photos()[3][0]).resize((128, 128))).float()
    corners = [[20, 10], [110, 30], [110, 100], [20, 120]]
    warped = TF.perspective(image, [[0, 0], [127, 0], [127, 127], [0, 127]], corners,
                            interpolation=TF.InterpolationMode.BILINEAR)
    quad = Region.from_corners([((x + 0.5) / 128, (y + 0.5) / 128) for x, y in corners])
    back = rectify(warped, quad.quad(), (128, 128))
    inner = (slice(None), slice(16, 112), slice(16, 112))
    err = (back[inner] - image[inner]).abs().mean().item()
    unrectified = (torch.nn.functional.interpolate(warped[None], size=(128, 128))[0][inner] - image[inner]).abs()
    assert err < 12 and err < unrectified.mean().item() / 2
    assert np.isfinite(err)


def test_the_readme_planogram_example_validates():
    readme = (ROOT / "README.md").read_text()
    start = readme.index('{"camera_id": "store-12-cam-03"')
    example = parse_planogram(readme[start:readme.index("```", start)])
    assert example.slots[1].region.corners is not None and len(example.slots) == 2


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"camera_id": ' + b"9" * 5000 + b"}"],
                         ids=["nested-too-deep", "integer-too-long"])
def test_json_that_python_cannot_parse_is_a_malformed_planogram(raw):
    """RecursionError and ValueError from the JSON parser: a refusal with a reason, never an
    exception that would stop the service reading the planogram topic (a crash loop, since the
    bad record is the latest for its key and stays)."""
    with pytest.raises(PlanogramError) as refused:
        parse_planogram(raw)
    assert refused.value.reason == PlanogramReason.MALFORMED


def test_facings_are_cut_on_one_torch_thread_and_the_threads_are_restored(monkeypatch):
    import catalog.planogram as planogram

    image = to_tensor(photo(store_photos()[0][0]))
    regions = [Region(x0=0.0, y0=0.0, x1=0.5, y1=0.5), Region(x0=0.5, y0=0.5, x1=1.0, y1=1.0)]
    before = torch.get_num_threads()
    threads_seen: list[int] = []

    def resized(patch, size):
        threads_seen.append(torch.get_num_threads())
        return real_resized(patch, size)

    real_resized = planogram.resized
    monkeypatch.setattr(planogram, "resized", resized)
    try:
        torch.set_num_threads(2)
        many = planogram.crop_regions(image, regions, (224, 224))
        assert threads_seen == [1, 1] and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.equal(planogram.crop_regions(image, regions, (224, 224)), many), "the same pixels either way"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
