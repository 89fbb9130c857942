"""Small shelf frames for the streaming tests: real product photos side by side, the planogram
they follow, and a catalogue (fast model, seeded random weights) holding exactly those photos.

A facing cut from such a frame is the reference photo itself, resized twice, so even a model
with random weights matches it to its own product: the tests check the plumbing (regions,
crops, batching, events), not recognition quality (docs/quality.md measures that).
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from catalog.build import build_catalog, references_from_folder
from catalog.planogram import EMPTY_SKU
from tests.photos import REFERENCES, encode

SKUS = ("Alpro-Blueberry-Soyghurt", "Banana", "Bravo-Orange-Juice", "Carrots")
FACING = 160  # pixels per facing side in a composed frame


def reference(sku: str) -> Image.Image:
    with Image.open(sorted((REFERENCES / sku).glob("*.jpg"))[0]) as img:
        return img.convert("RGB")


def empty_patch() -> Image.Image:
    """A bare shelf: light grey with a darker back edge."""
    img = Image.new("RGB", (FACING, FACING), (200, 198, 190))
    img.paste((90, 88, 84), (0, 0, FACING, FACING // 5))
    return img


def build_shelf_catalog(folder: Path) -> Path:
    """A catalogue of the four SKUs plus the reserved empty-shelf entry; returns its path."""
    refs = folder / "refs"
    for sku in SKUS:
        (refs / sku).mkdir(parents=True)
        reference(sku).save(refs / sku / "a.jpg", quality=95)
    (refs / EMPTY_SKU).mkdir(parents=True)
    empty_patch().save(refs / EMPTY_SKU / "a.jpg", quality=95)
    catalog = build_catalog(references_from_folder(refs), model="mobilenet_v3_small", weights="none", device="cpu",
                            progress=False)
    path = folder / "shelf.safetensors"
    catalog.save(path)
    return path


def frame(contents: list[str | None], rows: int = 1) -> bytes:
    """A JPEG of ``rows`` rows of facings; ``contents`` row by row, None for an empty facing."""
    per_row = len(contents) // rows
    img = Image.new("RGB", (per_row * FACING, rows * FACING), (255, 255, 255))
    for i, sku in enumerate(contents):
        tile = empty_patch() if sku is None else reference(sku).resize((FACING, FACING), Image.Resampling.BILINEAR)
        img.paste(tile, ((i % per_row) * FACING, (i // per_row) * FACING))
    return encode(img, "JPEG", quality=95)


def planogram(camera_id: str, expected: list[str], rows: int = 1, version: str = "v1") -> dict:
    """The planogram of a frame made by :func:`frame` with ``expected`` in its slots."""
    per_row = len(expected) // rows
    slots = []
    for i, sku in enumerate(expected):
        r, p = divmod(i, per_row)
        slots.append({"id": f"r{r}p{p}", "sku": sku, "row": r, "position": p, "region": {
            "x0": p / per_row, "y0": r / rows, "x1": (p + 1) / per_row, "y1": (r + 1) / rows}})
    return {"camera_id": camera_id, "version": version, "slots": slots}


def boxes_header(n: int, rows: int = 1) -> bytes:
    """The ``shelfmatch-boxes`` header of every facing of an ``n``-facing frame."""
    per_row = n // rows
    return json.dumps([{"id": f"b{i}", "box": [(i % per_row) / per_row, (i // per_row) / rows,
                                               (i % per_row + 1) / per_row, (i // per_row + 1) / rows]}
                       for i in range(n)]).encode()
