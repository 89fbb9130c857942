"""The wire contract: input headers, the events published per photo, dead-letter headers.

A photo matched whole gets a :class:`MatchEvent` (``schema_version`` 1); a photo with regions
(its camera's planogram, or boxes in the ``shelfmatch-boxes`` header: see :mod:`consumer.facings`)
gets a :class:`ComplianceEvent` (``schema_version`` 2), one per photo, with a result per facing.
``shelfmatch schema`` prints the JSON Schema of each. Changes that remove or retype a field bump
the version; adding optional fields does not.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from catalog.errors import ImageRejected
from catalog.preprocess import RejectReason

SCHEMA_VERSION: Literal[1] = 1
COMPLIANCE_SCHEMA_VERSION: Literal[2] = 2

# Input headers we read; anything else is ignored.
HEADER_CAMERA = "camera-id"
HEADER_STORE = "store-id"
HEADER_SHELF = "shelf-id"
HEADER_CAPTURED = "captured-at"
HEADER_CONTENT_TYPE = "content-type"
KNOWN_HEADERS = (HEADER_CAMERA, HEADER_STORE, HEADER_SHELF, HEADER_CAPTURED, HEADER_CONTENT_TYPE)
# The key and the headers we read are copied into the event (and the key is the event's key):
# one of 1 MB would make an event that an output topic's default max.message.bytes (1 MB)
# refuses, and that event's partition would stall. Ids and timestamps are far shorter.
MAX_FIELD_BYTES = 1024


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Model):
    """Where the photo was read: with ``event_id`` it identifies the photo for de-duplication."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int = Field(description="Kafka record timestamp (ms since the epoch)")


class Photo(_Model):
    """What the producer told us about the photo (record key and headers)."""

    key: str | None = Field(None, description="record key (the camera id, by convention)")
    camera_id: str | None = Field(None, description="`camera-id` header, else the record key")
    store_id: str | None = None
    shelf_id: str | None = None
    captured_at: datetime | None = Field(None, description="`captured-at` header (RFC 3339)")
    content_type: str | None = None
    width: int = Field(description="decoded width in pixels (after EXIF rotation)")
    height: int = Field(description="decoded height in pixels (after EXIF rotation)")


class CatalogRef(_Model):
    version: str = Field(description="content hash of the catalogue file used")
    model: str = Field(description="backbone name")
    weights: str = Field(description="identity of the weights")


class Candidate(_Model):
    sku: str
    score: float = Field(description="cosine similarity to the product's best reference, -1..1")


class Latency(_Model):
    """Milliseconds spent per stage before the event was handed to the producer."""

    decode: float
    batch_wait: float = Field(description="from the record's arrival to its batch closing")
    embed: float = Field(description="the whole batch's forward pass")
    match: float = Field(description="the whole batch's similarity and top-k")
    pipeline: float = Field(description="from the record's arrival to the event's creation")


class MatchEvent(_Model):
    """One per input photo on the output topic, keyed like the input record."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(description='"{topic}/{partition}/{offset}" of the input record; stable across retries')
    source: Source
    photo: Photo
    catalog: CatalogRef
    verdict: Literal["match", "ambiguous", "unknown"]
    best: Candidate
    margin: float = Field(description="best score minus the runner-up's (0 if only one product)")
    candidates: list[Candidate] = Field(description="top-k products, best first")
    threshold: float
    min_margin: float
    batch_size: int
    latency_ms: Latency
    processed_at: datetime


def event_id(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def parse_headers(key: bytes | None, headers: Sequence[tuple[str, bytes]]) -> dict:
    """Read the record key and our known headers; malformed ones raise ``bad-header``.

    A header we read that appears more than once counts with its last value (as the Java
    client's ``Headers.lastHeader``); headers under other names are not read at all, whatever
    their size or bytes (a dead letter keeps them unchanged)."""
    fields: dict = {}
    if key is not None and len(key) > MAX_FIELD_BYTES:
        raise ImageRejected(RejectReason.BAD_HEADER.value, f"record key is {len(key)} bytes, over {MAX_FIELD_BYTES}")
    try:
        fields["key"] = key.decode("utf-8") if key is not None else None
    except UnicodeDecodeError as exc:
        raise ImageRejected(RejectReason.BAD_HEADER.value, f"record key is not UTF-8: {exc}") from exc
    for name, raw in headers:
        if name not in KNOWN_HEADERS or raw is None:
            continue
        if len(raw) > MAX_FIELD_BYTES:
            raise ImageRejected(
                RejectReason.BAD_HEADER.value, f"header {name} is {len(raw)} bytes, over {MAX_FIELD_BYTES}"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImageRejected(RejectReason.BAD_HEADER.value, f"header {name} is not UTF-8: {exc}") from exc
        if name == HEADER_CAPTURED:
            try:
                stamp = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError as exc:
                raise ImageRejected(RejectReason.BAD_HEADER.value, f"captured-at {text!r} is not RFC 3339") from exc
            if stamp.tzinfo is None:
                raise ImageRejected(RejectReason.BAD_HEADER.value, f"captured-at {text!r} has no UTC offset")
            fields["captured_at"] = stamp
        else:
            fields[name.replace("-", "_")] = text
    fields.setdefault("camera_id", fields["key"])
    return fields


def dead_letter_headers(
    headers: Sequence[tuple[str, bytes]],
    *,
    reason: str,
    error: str,
    topic: str,
    partition: int,
    offset: int,
    truncated_from: int | None = None,
    first_offset: int | None = None,
) -> list[tuple[str, bytes]]:
    """The original headers followed by ours (Kafka Connect style, with stable reason codes).
    A dead letter for a range of records (``first_offset`` to ``offset``) names its first offset
    in ``dlq-source-offset`` and its last in ``dlq-source-offset-last``."""
    ours = [
        ("dlq-reason", reason),
        ("dlq-error", error[:1000]),
        ("dlq-source-topic", topic),
        ("dlq-source-partition", str(partition)),
        ("dlq-source-offset", str(offset if first_offset is None else first_offset)),
    ]
    if first_offset is not None:
        ours.append(("dlq-source-offset-last", str(offset)))
    if truncated_from is not None:
        ours.append(("dlq-value-truncated-from", str(truncated_from)))
    return [*headers, *((k, v.encode()) for k, v in ours)]


# The status of a facing. Bounded (four values), so it labels shelfmatch_facings_total.
FacingStatus = Literal["ok", "wrong-product", "empty", "unknown"]
FACING_STATUSES: tuple[FacingStatus, ...] = ("ok", "wrong-product", "empty", "unknown")


class Box(_Model):
    """A region in normalised frame coordinates (0..1, origin top-left)."""

    x0: float
    y0: float
    x1: float
    y1: float


class FacingResult(_Model):
    """What one facing of the frame holds, and whether that is what belongs there."""

    slot: str | None = Field(description="planogram slot id; null for a detector box that no slot covers")
    box_id: str | None = Field(None, description="the detector's id of the box, when the photo came with boxes")
    region: Box
    expected_sku: str | None = Field(description="the planogram's product for the slot; null without one")
    status: FacingStatus = Field(description="ok | wrong-product | empty | unknown (see the README)")
    best: Candidate
    margin: float | None = Field(
        description="the expected product's score minus the best other product's (the verification's lead); "
        "null without an expected product in the catalogue")
    expected_score: float | None = Field(description="the expected product's score; null without one")
    empty_score: float | None = Field(description="the score of the reserved empty-shelf entry; null without one")
    candidates: list[Candidate] = Field(description="top-k products, best first")


class PlanogramRef(_Model):
    camera_id: str
    version: str = Field(description="the planogram's own version string, as published")


class FrameSummary(_Model):
    facings: int
    counts: dict[FacingStatus, int] = Field(description="facings per status (every status present, 0 included)")
    compliance: float | None = Field(
        description="ok / (facings - unknown): the share of the facings that could be judged that hold the "
        "right product; null when none could")
    share_of_shelf: dict[str, float] = Field(
        description="per product shown (the expected one for ok, the best other for wrong-product), its share of "
        "the facings that show a product")


class OperatingPoint(_Model):
    """The verification's operating point (``shelfmatch catalog calibrate-compliance``)."""

    min_lead: float
    min_score: float
    empty_margin: float
    unknown_below: float


class ComplianceEvent(_Model):
    """One per input photo that has regions, keyed like the input record."""

    schema_version: Literal[2] = COMPLIANCE_SCHEMA_VERSION
    event_id: str = Field(description='"{topic}/{partition}/{offset}" of the input record; stable across retries')
    source: Source
    photo: Photo
    catalog: CatalogRef
    regions_from: Literal["planogram", "boxes"]
    planogram: PlanogramRef | None = Field(description="the planogram in force for the camera; null without one")
    facings: list[FacingResult] = Field(description="in planogram slot order, or the header's box order")
    summary: FrameSummary
    operating_point: OperatingPoint | None = Field(
        description="the catalogue's compliance calibration the statuses were judged with; null: the default rule "
        "(ok when the expected product scores best, empty when the empty-shelf entry does)")
    latency_ms: Latency
    processed_at: datetime
