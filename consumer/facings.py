"""Facings: the regions of a shelf frame that are embedded one by one, and their crops.

A photo's regions come from one of two places (:func:`regions_for`):

- the ``shelfmatch-boxes`` header, boxes that an upstream detector found (JSON, normalised
  coordinates, see :data:`HEADER_BOXES`); when the camera also has a planogram, each box takes
  the slot it overlaps most (at least :data:`MIN_SLOT_OVERLAP` of the box), and so its expected SKU;
- else the slots of the camera's planogram (``camera-id`` header, else the record key);
- else none: the photo is matched whole and gets today's :class:`consumer.messages.MatchEvent`.

Bad regions are the photo's dead letter, never a crash: a header that is not the documented
JSON is ``bad-boxes``; a box outside the frame or without area is ``bad-region``; a frame so
small that a facing would be under :data:`MIN_FACING_PIXELS` on a side, or far smaller than its
planogram's frame (:func:`catalog.planogram.check_frame`), is ``frame-too-small``.

Crops are cut, resized and kept as uint8 on the model's device by
:func:`catalog.planogram.crop_regions`, the same function the offline evaluation and calibration
use; the embedder then normalises them exactly as it does whole photos.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ValidationError

from catalog.errors import ImageRejected, PlanogramError
from catalog.planogram import Planogram, Region, Slot, check_frame, crop_regions

HEADER_BOXES = "shelfmatch-boxes"
# Boxes are larger than the ids the other headers carry: 1000 boxes of ~60 bytes each.
MAX_BOXES_BYTES = 64 * 1024
MAX_BOXES = 1000
MAX_BOX_ID_CHARS = 128
# A facing narrower or shorter than this in the original frame holds too few pixels to recognise.
MIN_FACING_PIXELS = 8
# A detector's box takes the planogram slot that covers at least this share of its area.
MIN_SLOT_OVERLAP = 0.5

BAD_BOXES = "bad-boxes"
BAD_REGION = "bad-region"
FRAME_TOO_SMALL = "frame-too-small"
REGION_REASONS = (BAD_BOXES, BAD_REGION, FRAME_TOO_SMALL)


@dataclass(frozen=True)
class Frames:
    """How photos with regions are read: ``planograms()`` gives the planograms in force now, by
    camera id (a snapshot that is replaced whole, so a decode thread reads one consistent set);
    a frame is decoded with its longer side at most ``max_side`` pixels."""

    planograms: Callable[[], Mapping[str, Planogram]]
    max_side: int = 1600


@dataclass(frozen=True)
class Facing:
    """One region to embed: where it is and, when a planogram says so, what belongs there."""

    region: Region
    slot: str | None = None  # the planogram slot id
    expected_sku: str | None = None
    box_id: str | None = None  # the detector's id for the box, when it gave one


@dataclass(frozen=True)
class Regions:
    """The facings of one photo, where they came from, and the planogram in force for it."""

    origin: Literal["planogram", "boxes"]
    facings: tuple[Facing, ...]
    planogram: Planogram | None


def parse_boxes(raw: bytes) -> list[tuple[str | None, Region]]:
    """The ``shelfmatch-boxes`` header: a JSON array of ``{"id": "b1", "box": [x0, y0, x1, y1]}``
    (``id`` optional), coordinates normalised to 0..1 of the frame, origin top-left.
    Raises ``ImageRejected`` (``bad-boxes`` or ``bad-region``) with what is wrong."""
    if len(raw) > MAX_BOXES_BYTES:
        raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES} is {len(raw)} bytes, over {MAX_BOXES_BYTES}")
    try:
        items = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES} is not JSON: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # nested too deep, or an integer too long to parse
        raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES} cannot be parsed: {str(exc)[:200]}") from exc
    if not isinstance(items, list) or not items:
        raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES} must be a non-empty JSON array of boxes")
    if len(items) > MAX_BOXES:
        raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES} holds {len(items)} boxes, over {MAX_BOXES}")
    boxes: list[tuple[str | None, Region]] = []
    for n, item in enumerate(items):
        box = item.get("box") if isinstance(item, dict) else None
        box_id = item.get("id") if isinstance(item, dict) else None
        if (not isinstance(item, dict) or set(item) - {"id", "box"} or not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
                or not (box_id is None or (isinstance(box_id, str) and 0 < len(box_id) <= MAX_BOX_ID_CHARS))):
            raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES}[{n}] must be {{\"id\": str, \"box\": [x0, y0, x1, y1]}}, "
                                f"got {json.dumps(item)[:200]}")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except OverflowError as exc:  # an integer beyond any float
            raise ImageRejected(BAD_BOXES, f"{HEADER_BOXES}[{n}] has a coordinate beyond any number") from exc
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise ImageRejected(BAD_REGION, f"{HEADER_BOXES}[{n}] {box} lies outside the frame (0..1)")
        try:
            region = Region(x0=x0, y0=y0, x1=x1, y1=y1, corners=None)
        except ValidationError as exc:
            raise ImageRejected(BAD_REGION, f"{HEADER_BOXES}[{n}] {box}: {exc.errors()[0]['msg']}") from exc
        boxes.append((box_id, region))
    return boxes


def regions_for(
    fields: Mapping[str, object], headers: Sequence[tuple[str, bytes | None]],
    planograms: Mapping[str, Planogram],
) -> Regions | None:
    """The regions of a photo from its headers and the planograms in force (see the module
    docstring for the order); None for a whole photo."""
    camera = fields.get("camera_id")
    planogram = planograms.get(camera) if isinstance(camera, str) else None
    raw = None
    for name, value in headers:
        if name == HEADER_BOXES and value is not None:
            raw = value  # the last one counts, as for the other headers
    if raw is not None:
        facings = []
        for box_id, region in parse_boxes(raw):
            slot = _slot_of(region, planogram) if planogram is not None else None
            facings.append(Facing(region=region, box_id=box_id, slot=slot.id if slot else None,
                                  expected_sku=slot.sku if slot else None))
        return Regions(origin="boxes", facings=tuple(facings), planogram=planogram)
    if planogram is None:
        return None
    return Regions(origin="planogram", planogram=planogram, facings=tuple(
        Facing(region=s.region, slot=s.id, expected_sku=s.sku) for s in planogram.slots))


def _slot_of(region: Region, planogram: Planogram) -> Slot | None:
    best = max(planogram.slots, key=lambda s: s.region.intersection(region))
    return best if best.region.intersection(region) >= MIN_SLOT_OVERLAP * region.area else None


def check_regions(regions: Regions, width: int, height: int) -> None:
    """Refuse a frame its facings cannot be cut from (``frame-too-small``); ``width`` and
    ``height`` are the original frame's."""
    if regions.planogram is not None:
        try:
            check_frame(regions.planogram, width, height)
        except PlanogramError as exc:
            raise ImageRejected(FRAME_TOO_SMALL, str(exc)) from exc
    for f in regions.facings:
        r = f.region
        w, h = (r.x1 - r.x0) * width, (r.y1 - r.y0) * height
        if w < MIN_FACING_PIXELS or h < MIN_FACING_PIXELS:
            name = f.slot or f.box_id or f"({r.x0:.3f}, {r.y0:.3f}, {r.x1:.3f}, {r.y1:.3f})"
            raise ImageRejected(FRAME_TOO_SMALL, f"facing {name} is {w:.1f}x{h:.1f} pixels of this {width}x{height} "
                                f"frame, under {MIN_FACING_PIXELS} on a side")


def crop(frame: torch.Tensor, facings: Sequence[Facing], size: tuple[int, int],
         device: torch.device | None = None) -> torch.Tensor:
    """The facings of ``frame`` (uint8 (3, H, W)) as uint8 (N, 3, height, width) for ``size`` =
    (width, height), on ``device`` (default: the frame's); see :func:`catalog.planogram.crop_regions`."""
    return crop_regions(frame, [f.region for f in facings], size, device)
