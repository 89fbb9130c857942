"""Planograms as data: per camera, the slots it sees, each with a region and the expected product.

A region is a box in normalised frame coordinates (0..1, origin top-left, x to the right, y down),
so that one planogram fits any resolution the camera sends. A bay seen at an angle also gives the
four ``corners`` of the facing (top-left, top-right, bottom-right, bottom-left); :func:`rectify`
maps that quadrilateral onto an upright rectangle before the crop is embedded.

Every way a planogram can be refused has a stable reason code (:class:`PlanogramReason`), a
bounded set fit for a metric label: a record that does not validate is logged with its reason, counted,
and the previous planogram for that camera stays in force (the streaming side decides that; this
module only says why). Structural checks (the frame, zero area, duplicate ids, overlaps, corners)
run when the model is built; :func:`check_against_catalog` adds the one that needs a catalogue
(every expected SKU must be a product of it).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator, Sequence
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from catalog.errors import PlanogramError
from catalog.preprocess import resized

PLANOGRAM_FORMAT = "shelfmatch-planogram/1"
# The catalogue entry reserved for an empty facing (built from empty-shelf patches, see
# catalog/shelf.py): a planogram can never expect it, and it is never a "wrong product".
EMPTY_SKU = "__empty__"
# Two slots may share at most this share of the smaller one's area: boxes drawn edge to edge with
# a pixel of jitter pass; a slot drawn twice or nested in another is refused, since its facing
# would be counted twice in the frame's summary and share of shelf.
MAX_OVERLAP = 0.1
MAX_SLOTS = 1000
MAX_ID_CHARS = 128


class PlanogramReason(StrEnum):
    """Why a planogram was refused; bounded, used as a metric label."""

    MALFORMED = "malformed"  # not JSON, a field missing or of the wrong type
    OUTSIDE_FRAME = "region-outside-frame"  # a coordinate outside 0..1
    ZERO_AREA = "zero-area"  # x0 >= x1 or y0 >= y1
    BAD_CORNERS = "bad-corners"  # corners not a convex quadrilateral in TL, TR, BR, BL order
    DUPLICATE_SLOT = "duplicate-slot-id"
    OVERLAPPING_SLOTS = "overlapping-slots"
    RESERVED_SKU = "reserved-sku"  # a slot expects EMPTY_SKU
    UNKNOWN_SKU = "unknown-sku"  # expected SKU not in the catalogue
    FRAME_TOO_SMALL = "frame-too-small"  # see check_frame


def _refuse(reason: PlanogramReason, message: str, **ctx: Any) -> PydanticCustomError:
    # The error type carries the reason code through pydantic's ValidationError.
    return PydanticCustomError(reason.value, message, ctx or None)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Point = tuple[float, float]


class Region(_Model):
    """A box in normalised frame coordinates; ``corners`` for a facing seen at an angle."""

    x0: float = Field(ge=0.0, le=1.0, description="left edge, 0..1 of the frame width")
    y0: float = Field(ge=0.0, le=1.0, description="top edge, 0..1 of the frame height")
    x1: float = Field(ge=0.0, le=1.0, description="right edge, > x0")
    y1: float = Field(ge=0.0, le=1.0, description="bottom edge, > y0")
    corners: tuple[Point, Point, Point, Point] | None = Field(
        default=None,
        description="four (x, y) points, normalised: top-left, top-right, bottom-right, bottom-left of the "
        "facing; the box must contain them. When given, the crop is rectified from these corners.",
    )

    @model_validator(mode="after")
    def _check(self) -> Region:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise _refuse(PlanogramReason.ZERO_AREA, "region has no area: needs x0 < x1 and y0 < y1")
        if self.corners is not None:
            eps = 1e-6
            for x, y in self.corners:
                if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                    raise _refuse(PlanogramReason.OUTSIDE_FRAME, "a corner lies outside the frame")
                if not (self.x0 - eps <= x <= self.x1 + eps and self.y0 - eps <= y <= self.y1 + eps):
                    raise _refuse(PlanogramReason.BAD_CORNERS, "a corner lies outside the region's box")
            if not _convex_clockwise(self.corners):
                raise _refuse(
                    PlanogramReason.BAD_CORNERS,
                    "corners must be a convex quadrilateral given top-left, top-right, bottom-right, bottom-left",
                )
        return self

    @classmethod
    def from_corners(cls, corners: Sequence[Point]) -> Region:
        """The region whose box is the bounding box of ``corners``."""
        xs, ys = [float(p[0]) for p in corners], [float(p[1]) for p in corners]
        pts = tuple((float(x), float(y)) for x, y in corners)
        return cls(x0=min(xs), y0=min(ys), x1=max(xs), y1=max(ys), corners=pts)  # type: ignore[arg-type]

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def intersection(self, other: Region) -> float:
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0.0, w) * max(0.0, h)

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels of a ``width`` x ``height`` frame, at least 1 x 1."""
        left = min(int(self.x0 * width), width - 1)
        top = min(int(self.y0 * height), height - 1)
        right = max(left + 1, min(width, round(self.x1 * width)))
        bottom = max(top + 1, min(height, round(self.y1 * height)))
        return left, top, right, bottom

    def quad(self) -> tuple[Point, Point, Point, Point]:
        """The corners, or the box's own corners (TL, TR, BR, BL) when none were given."""
        if self.corners is not None:
            return self.corners
        return ((self.x0, self.y0), (self.x1, self.y0), (self.x1, self.y1), (self.x0, self.y1))


def _convex_clockwise(corners: Sequence[Point]) -> bool:
    """True when TL, TR, BR, BL turn the same way at every corner (clockwise with y down)."""
    for i in range(4):
        (ax, ay), (bx, by), (cx, cy) = corners[i], corners[(i + 1) % 4], corners[(i + 2) % 4]
        if (bx - ax) * (cy - by) - (by - ay) * (cx - bx) <= 0:
            return False
    return True


class Slot(_Model):
    """One facing position of the bay and the product that belongs there."""

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="unique within the planogram")
    region: Region
    sku: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="the expected product (a catalogue SKU)")
    row: int = Field(ge=0, description="shelf row, 0 = top")
    position: int = Field(ge=0, description="facing position in the row, 0 = leftmost")


class FrameSize(_Model):
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Planogram(_Model):
    """The slots one camera sees; ``version`` names this revision (events carry it)."""

    camera_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    version: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    slots: tuple[Slot, ...] = Field(min_length=1, max_length=MAX_SLOTS)
    frame: FrameSize | None = Field(
        default=None, description="the frame size the planogram was drawn on; frames far smaller are refused"
    )

    @model_validator(mode="after")
    def _check(self) -> Planogram:
        seen: set[str] = set()
        for slot in self.slots:
            if slot.id in seen:
                raise _refuse(PlanogramReason.DUPLICATE_SLOT, "slot id {id} appears twice", id=slot.id)
            seen.add(slot.id)
            if slot.sku == EMPTY_SKU:
                raise _refuse(
                    PlanogramReason.RESERVED_SKU, "slot {id} expects the reserved SKU " + EMPTY_SKU, id=slot.id
                )
        regions = [s.region for s in self.slots]
        order = sorted(range(len(regions)), key=lambda i: regions[i].x0)
        for n, i in enumerate(order):  # sweep along x: only boxes that start before i ends can meet it
            a = regions[i]
            for j in order[n + 1:]:
                b = regions[j]
                if b.x0 >= a.x1:
                    break
                if a.intersection(b) > MAX_OVERLAP * min(a.area, b.area):
                    raise _refuse(
                        PlanogramReason.OVERLAPPING_SLOTS, "slots {a} and {b} overlap",
                        a=self.slots[i].id, b=self.slots[j].id,
                    )
        return self

    def skus(self) -> tuple[str, ...]:
        """The expected SKU of each slot, in slot order."""
        return tuple(s.sku for s in self.slots)


def planogram_schema() -> dict[str, Any]:
    """The JSON Schema of a planogram record (``shelfmatch schema`` prints it)."""
    return Planogram.model_json_schema()


def parse_planogram(raw: str | bytes | dict[str, Any], *, skus: Collection[str] | None = None) -> Planogram:
    """A planogram from JSON (or its decoded dict); with ``skus``, also checked against a catalogue.

    Raises :class:`PlanogramError` whose ``reason`` is a :class:`PlanogramReason` value."""
    try:
        data = json.loads(raw) if isinstance(raw, str | bytes) else raw
        planogram = Planogram.model_validate(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanogramError(PlanogramReason.MALFORMED, f"planogram is not JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlanogramError(_reason(first["type"]), _describe(first)) from exc
    # After ValidationError, which is a ValueError too: JSON nested too deep, or a number too long.
    except (RecursionError, ValueError, OverflowError) as exc:
        raise PlanogramError(PlanogramReason.MALFORMED, f"planogram JSON cannot be parsed: {exc}") from exc
    if skus is not None:
        check_against_catalog(planogram, skus)
    return planogram


def _reason(error_type: str) -> PlanogramReason:
    if error_type in {r.value for r in PlanogramReason}:
        return PlanogramReason(error_type)
    if error_type in {"greater_than_equal", "less_than_equal"}:  # a coordinate outside 0..1 (or row < 0)
        return PlanogramReason.OUTSIDE_FRAME
    return PlanogramReason.MALFORMED


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def check_against_catalog(planogram: Planogram, skus: Collection[str]) -> None:
    """Refuse a planogram that expects a product the catalogue does not hold."""
    known = skus if isinstance(skus, set | frozenset) else set(skus)
    missing = sorted({s.sku for s in planogram.slots if s.sku not in known})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PlanogramError(PlanogramReason.UNKNOWN_SKU, f"planogram {planogram.camera_id}@{planogram.version} "
                             f"expects SKUs the catalogue lacks: {shown}")


# A frame smaller than this share of the planogram's frame (per side) cannot show its facings at the
# detail the regions were drawn for; such a frame is refused rather than matched on a blur.
MIN_FRAME_SCALE = 0.25


def check_frame(planogram: Planogram, width: int, height: int) -> None:
    """Refuse a frame far smaller than the planogram expects (``frame-too-small``)."""
    if planogram.frame is None:
        return
    if width < MIN_FRAME_SCALE * planogram.frame.width or height < MIN_FRAME_SCALE * planogram.frame.height:
        raise PlanogramError(
            PlanogramReason.FRAME_TOO_SMALL,
            f"frame {width}x{height} is far smaller than the planogram's {planogram.frame.width}x"
            f"{planogram.frame.height} (less than {MIN_FRAME_SCALE:.0%} per side)",
        )


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 3x3 projective map taking the four points ``src`` (4, 2) onto ``dst`` (4, 2)."""
    rows = []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist(), strict=True):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
    a = torch.tensor(rows, dtype=torch.float64)
    b = dst.to(torch.float64).reshape(8)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, h.new_ones(1)]).reshape(3, 3)


def rectify(image: torch.Tensor, corners: Sequence[Point], size: tuple[int, int]) -> torch.Tensor:
    """The quadrilateral ``corners`` (normalised TL, TR, BR, BL) of ``image`` (C, H, W) warped onto
    an upright ``size`` = (height, width) rectangle, bilinear; stays on the image's device and dtype.

    Each output pixel centre is mapped back through the homography into the source, then sampled
    with ``grid_sample``, so a box given as corners gives the same pixels as a plain resized crop."""
    if image.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(image.shape)}")
    out_h, out_w = size
    # Output unit square corners -> source points in grid_sample's [-1, 1] coordinates
    # (align_corners=False: -1 and 1 are the outer edges of the edge pixels, as normalised boxes are).
    unit = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    src = torch.tensor([[x * 2 - 1, y * 2 - 1] for x, y in corners])
    h = homography(unit, src).to(torch.float32)
    ys = (torch.arange(out_h, dtype=torch.float32) + 0.5) / out_h
    xs = (torch.arange(out_w, dtype=torch.float32) + 0.5) / out_w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1) @ h.T  # (out_h, out_w, 3)
    grid = (pts[..., :2] / pts[..., 2:3]).unsqueeze(0).to(image.device)
    dtype = image.dtype if image.is_floating_point() else torch.float32
    sampled = F.grid_sample(
        image.unsqueeze(0).to(dtype), grid.to(dtype), mode="bilinear", padding_mode="border", align_corners=False
    )[0]
    if not image.is_floating_point():
        sampled = sampled.round().clamp(0, torch.iinfo(image.dtype).max).to(image.dtype)
    return sampled


def crop_regions(frame: torch.Tensor, regions: Sequence[Region], size: tuple[int, int],
                 device: torch.device | None = None) -> torch.Tensor:
    """The ``regions`` of ``frame`` (uint8 (3, H, W)) as uint8 (N, 3, height, width) for ``size`` =
    (width, height), on ``device`` (default: the frame's).

    The one way facings are cut, by the service and by the offline evaluation and calibration, so
    that an operating point chosen offline sees the pixels the service embeds. Each region is its
    pixel box (edges rounded to whole pixels) resized with antialiased bilinear interpolation, as
    whole photos are resized: a large facing is averaged rather than aliased. On a CPU that runs on
    uint8 (torch's vectorised path: 4 ms for 32 facings of a 1600x800 frame on one core, where
    ``roi_align`` took 70 ms); on a GPU in float, which differs from the CPU's uint8 result by at
    most one grey level. A region drawn with four corners is rectified instead (:func:`rectify`)."""
    device = device or frame.device
    width, height = size
    image = frame.to(device, non_blocking=True).unsqueeze(0)
    if device.type != "cpu":  # antialiased resizing of uint8 is a CPU path; elsewhere in float, converted once
        image = image.float()
    _, _, fh, fw = image.shape
    out = torch.empty((len(regions), 3, height, width), dtype=torch.uint8, device=device)
    with one_torch_thread() if device.type == "cpu" else contextlib.nullcontext():
        for i, r in enumerate(regions):
            if r.corners is not None:
                rectified = rectify(image[0], r.corners, (height, width))
                out[i] = rectified.round().clamp(0, 255) if rectified.is_floating_point() else rectified
                continue
            x0, x1 = min(round(r.x0 * fw), fw - 1), round(r.x1 * fw)
            y0, y1 = min(round(r.y0 * fh), fh - 1), round(r.y1 * fh)
            patch = image[:, :, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
            out[i] = resized(patch, size)[0]
    return out


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU work inside on the calling thread alone. A frame's cut is dozens of small
    resizes: torch's parallel loop over each costs more than it gains, and leaves its team of OpenMP
    threads spinning on the cores where the network's threads run the next batch (docs/performance.md,
    *Facings*).
    ``torch.set_num_threads`` sets the calling thread's count and the default of threads that have
    not yet run parallel work; the count is restored on the way out."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
