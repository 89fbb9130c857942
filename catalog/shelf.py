"""Synthetic shelf frames composed from real store photos, with their planogram and ground truth.

There is no public set of shelf-bay photos labelled per facing against a planogram for the Grocery
Store products, so frames are composed: a bay of ``rows`` shelves, each holding ``facings`` slots;
the planogram assigns products to slots in blocks of one to three facings (as planograms do); each
facing shows a real store photo of a product (the dataset's **val** split by default; the test
split is never read), resized into its slot. Some facings are swapped for a photo of another
product (``wrong-product``), some are left empty: the empty slot shows the bay behind it.

What is synthetic, and says so in docs/quality.md:

- the bay itself (:func:`bay_background`): a generated back panel (flat colour, lighting gradient,
  pegboard holes, sensor noise), shelf boards with a price strip and tags, and a shadow under each
  board. No photo of a real empty shelf is used: an empty facing is a crop of that generated bay;
- the layout: facings are the store photos squashed into upright slots (product photos in the
  dataset are hand-held close-ups, some of loose fruit in crates, not packshots on a shelf), with
  a small random crop per facing so that the same photo never lands twice pixel for pixel;
- one val photo can appear in several facings and frames (the val split has 3 to 6 photos per
  product, 60 of the 81 products).

Everything is deterministic from ``seed``: the same seed gives the same frame, planogram and truth.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from catalog.build import Reference
from catalog.compliance import (
    CALIBRATION_CONFIDENCE,
    DEFAULT_COMPLIANCE,
    ComplianceQuality,
    FacingStatus,
    FacingVerdict,
    best_threshold,
    calibrate_compliance,
    compliance_quality,
    facing_scores,
    judge,
    statuses,
)
from catalog.embedder import Embedder
from catalog.errors import CatalogError
from catalog.grocery import grocery_sets
from catalog.matcher import Matcher
from catalog.planogram import EMPTY_SKU, FrameSize, Planogram, Region, Slot, crop_regions
from catalog.preprocess import to_tensor
from catalog.store import Catalog, ComplianceCalibration
from catalog.update import add_references

# Seed of the bays the reserved empty entry is built from; evaluation frames use small seeds.
EMPTY_REFERENCE_SEED = 7_000_001
# The dataset beside the repository (../shared/datasets/grocery-store), as the quality scripts use it.
DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "grocery-store"
# Frames are composed from these seeds unless told otherwise: calibration and evaluation never share one.
CALIBRATION_SEED = 1
EVALUATION_SEED = 2


@dataclass(frozen=True)
class BayLayout:
    """How a composed frame looks and how often its facings are wrong or empty."""

    width: int = 1280
    height: int = 960
    rows: int = 4
    facings: int = 6  # per row
    wrong_rate: float = 0.15  # share of facings showing another product
    empty_rate: float = 0.10  # share of facings left empty
    gap: float = 0.02  # space between facings, share of the row's width


@dataclass(frozen=True)
class SlotTruth:
    """What a composed slot really holds."""

    slot_id: str
    expected: str
    status: FacingStatus  # ok, wrong-product or empty (never unknown: the truth is known)
    shown: str | None  # the SKU of the photo placed there; None when empty
    photo: str | None  # that photo's path


@dataclass(frozen=True)
class ShelfFrame:
    image: Image.Image  # RGB, layout.width x layout.height
    planogram: Planogram
    truth: tuple[SlotTruth, ...]  # in slot order


def val_photos(dataset: Path, skus: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """SKU -> its val photos (sorted), restricted to ``skus`` when given (e.g. a catalogue's)."""
    wanted = None if skus is None else set(skus)
    photos: dict[str, list[Path]] = {}
    for path, sku in grocery_sets(dataset)["val"]:
        if wanted is None or sku in wanted:
            photos.setdefault(sku, []).append(path)
    return {sku: sorted(paths) for sku, paths in sorted(photos.items())}


def calibration_photos(dataset: Path, catalog: Catalog) -> dict[str, list[Path]]:
    """SKU -> its photos in the dataset's train split that are not among ``catalog``'s references
    (compared by content, so that byte-identical copies count; a re-encoded reference does not),
    for the catalogue's SKUs: calibration frames made of them share no photo with the catalogue or
    with the val photos that evaluation composes from. Raises CatalogError when the catalogue lists
    no references or one cannot be read (its photo might be among them)."""
    if not catalog.references:
        raise CatalogError("the catalogue lists no references, so calibration photos cannot be told apart "
                           "from them: give the photos with --photos")
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    references: set[str] = set()
    for ref in catalog.references:
        try:
            references.add(digest(Path(ref)))
        except OSError as exc:
            raise CatalogError(f"reference {ref} of the catalogue cannot be read ({exc.strerror}), so calibration "
                               "photos cannot be told apart from it: give the photos with --photos") from exc
    wanted = set(catalog.skus)
    photos: dict[str, list[Path]] = {}
    for path, sku in grocery_sets(dataset)["train"]:
        if sku in wanted and digest(path) not in references:
            photos.setdefault(sku, []).append(path)
    if not photos:
        raise CatalogError(f"no train photos of the catalogue's products in {dataset} are left outside its "
                           "references: give labelled photos with --photos")
    return {sku: sorted(paths) for sku, paths in sorted(photos.items())}


def bay_background(width: int, height: int, rows: int, rng: np.random.Generator) -> Image.Image:
    """A generated empty bay (synthetic): back panel with pegboard holes, ``rows`` shelf boards."""
    base = rng.uniform(150, 235) + rng.uniform(-18, 18, size=3)  # greys to beiges
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 1.0 + rng.uniform(-0.15, 0.15) * (yy / height - 0.5) + rng.uniform(-0.1, 0.1) * (xx / width - 0.5)
    img = base[None, None, :] * light[..., None]
    pitch = int(rng.integers(14, 32))
    radius = max(1.5, pitch * rng.uniform(0.08, 0.16))
    ox, oy = rng.uniform(0, pitch, size=2)
    dx = (xx - ox) % pitch - pitch / 2
    dy = (yy - oy) % pitch - pitch / 2
    holes = (dx * dx + dy * dy) <= radius * radius
    img[holes] *= rng.uniform(0.25, 0.5)
    band = height / rows
    board_h = band * rng.uniform(0.07, 0.11)
    board = rng.uniform(90, 230) + rng.uniform(-15, 15, size=3)
    for r in range(rows):
        bottom = (r + 1) * band
        top = bottom - board_h
        # the board above casts a shadow on the panel under it
        shade_top = r * band
        shadow = np.clip(1 - (yy - shade_top) / (band * 0.25), 0, 1) * rng.uniform(0.15, 0.35)
        in_band = (yy >= shade_top) & (yy < top)
        img[in_band] *= (1 - shadow[in_band])[:, None]
        on_board = (yy >= top) & (yy < bottom)
        img[on_board] = board * (0.9 + 0.1 * (yy[on_board] - top)[:, None] / board_h)
    img += rng.normal(0, rng.uniform(2, 6), size=img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for r in range(rows):  # white price tags along each board's edge, with dark "text" lines
        bottom = (r + 1) * band
        top = bottom - board_h
        x = rng.uniform(0, width * 0.1)
        while x < width:
            w = rng.uniform(0.04, 0.07) * width
            y0, y1 = top + board_h * 0.2, bottom - board_h * 0.2
            draw.rectangle((x, y0, x + w, y1), fill=(245, 245, 240))
            for line in range(2):
                ly = y0 + (y1 - y0) * (0.3 + 0.35 * line)
                draw.line((x + w * 0.1, ly, x + w * rng.uniform(0.5, 0.9), ly), fill=(40, 40, 40), width=2)
            x += w + rng.uniform(0.08, 0.2) * width
    return out


def _slot_boxes(layout: BayLayout) -> list[tuple[int, int, Region]]:
    """(row, position, region) of every slot: facings stand on their row's board."""
    band = 1.0 / layout.rows
    width = (1.0 - layout.gap * (layout.facings + 1)) / layout.facings
    boxes = []
    for r in range(layout.rows):
        y1 = (r + 1) * band - band * 0.11  # the board's top at most
        y0 = r * band + band * 0.12
        for p in range(layout.facings):
            x0 = layout.gap + p * (width + layout.gap)
            boxes.append((r, p, Region(x0=round(x0, 6), y0=round(y0, 6), x1=round(x0 + width, 6), y1=round(y1, 6))))
    return boxes


def _facing(path: Path, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A store photo cropped a little at random, then squashed into a ``size`` slot."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    scale = rng.uniform(0.85, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)


def compose_frame(
    photos: Mapping[str, Sequence[Path]], *, seed: int, layout: BayLayout = BayLayout(),
    camera_id: str = "synthetic-cam", version: str | None = None,
) -> ShelfFrame:
    """One composed frame: its planogram (products in blocks) and what each slot really shows."""
    skus = sorted(s for s, paths in photos.items() if paths)
    if len(skus) < 2:
        raise ValueError("composing a frame needs photos of at least two products (one to swap in)")
    rng = np.random.default_rng(seed)
    image = bay_background(layout.width, layout.height, layout.rows, rng)
    boxes = _slot_boxes(layout)
    # The planogram: per row, blocks of 1-3 facings of one product, products drawn without
    # repetition until the pool is used up.
    pool: list[str] = []
    expected: list[str] = []
    for _ in range(layout.rows):
        filled = 0
        while filled < layout.facings:
            if not pool:
                pool = list(rng.permutation(skus))
            sku = pool.pop()
            n = min(int(rng.integers(1, 4)), layout.facings - filled)
            expected += [sku] * n
            filled += n
    slots = []
    truth = []
    kinds = rng.random(len(boxes))
    for (row, pos, region), sku, kind in zip(boxes, expected, kinds, strict=True):
        slot_id = f"r{row}-p{pos}"
        slots.append(Slot(id=slot_id, region=region, sku=sku, row=row, position=pos))
        if kind < layout.empty_rate:
            truth.append(SlotTruth(slot_id, sku, FacingStatus.EMPTY, None, None))
            continue
        shown = sku
        status = FacingStatus.OK
        if kind < layout.empty_rate + layout.wrong_rate:
            others = [s for s in skus if s != sku]
            shown = others[int(rng.integers(len(others)))]
            status = FacingStatus.WRONG_PRODUCT
        candidates = photos[shown]
        path = candidates[int(rng.integers(len(candidates)))]
        left, top, right, bottom = region.pixels(layout.width, layout.height)
        image.paste(_facing(path, (right - left, bottom - top), rng), (left, top))
        truth.append(SlotTruth(slot_id, sku, status, shown, str(path)))
    planogram = Planogram(
        camera_id=camera_id, version=version or f"synthetic-{seed}", slots=tuple(slots),
        frame=FrameSize(width=layout.width, height=layout.height),
    )
    return ShelfFrame(image=image, planogram=planogram, truth=tuple(truth))


def compose_frames(
    photos: Mapping[str, Sequence[Path]], count: int, *, seed: int = 0, layout: BayLayout = BayLayout()
) -> list[ShelfFrame]:
    """``count`` frames, frame i from seed ``seed * 100003 + i`` (disjoint runs for distinct seeds)."""
    return [compose_frame(photos, seed=seed * 100003 + i, layout=layout, camera_id=f"synthetic-cam-{i:03d}")
            for i in range(count)]


def empty_patches(count: int, *, seed: int, size: tuple[int, int] = (224, 224), rows: int = 4) -> list[Image.Image]:
    """``count`` crops of generated empty bays (synthetic), as facings of :func:`compose_frame` see
    them: the references of the catalogue's reserved empty entry. Use a seed that no evaluation
    frame uses, so that the entry is not built from the very bays it is measured on."""
    rng = np.random.default_rng(seed)
    layout = BayLayout(rows=rows)
    boxes = _slot_boxes(layout)
    out: list[Image.Image] = []
    while len(out) < count:
        bay = bay_background(layout.width, layout.height, rows, rng)
        for i in rng.permutation(len(boxes))[:6]:
            region = boxes[int(i)][2]
            out.append(bay.crop(region.pixels(layout.width, layout.height)).resize(size, Image.Resampling.BILINEAR))
            if len(out) == count:
                break
    return out


def facing_pixels(image: Image.Image, planogram: Planogram, size: tuple[int, int]) -> torch.Tensor:
    """(slots, 3, height, width) uint8: each slot cut from ``image`` and resized to ``size`` =
    (width, height) exactly as the service cuts facings (:func:`catalog.planogram.crop_regions`)."""
    return crop_regions(to_tensor(image), [slot.region for slot in planogram.slots], size)


@dataclass(frozen=True)
class LabelledFacings:
    """Every facing of some composed frames: its similarity row, expected SKU and truth."""

    scores: np.ndarray  # (facings, products) in the catalogue's SKU order
    expected: tuple[str, ...]
    truth: tuple[FacingStatus, ...]
    frame: np.ndarray  # (facings,) index of the facing's frame


def labelled_facings(frames: Sequence[ShelfFrame], catalog: Catalog, embedder: Embedder) -> LabelledFacings:
    """Crop, embed and match every facing of ``frames`` against ``catalog`` (the service's matcher)."""
    matcher = Matcher(catalog, device=torch.device("cpu"))
    rows, expected, truth, index = [], [], [], []
    for i, frame in enumerate(frames):
        pixels = facing_pixels(frame.image, frame.planogram, embedder.input_size)
        rows.append(matcher.scores(embedder.embed(pixels)).cpu().numpy())
        expected += [s.sku for s in frame.planogram.slots]
        truth += [t.status for t in frame.truth]
        index += [i] * len(frame.truth)
    return LabelledFacings(
        scores=np.concatenate(rows) if rows else np.zeros((0, len(catalog.skus)), np.float32),
        expected=tuple(expected), truth=tuple(truth), frame=np.array(index, dtype=np.int64),
    )


def judge_frame(
    image: Image.Image, planogram: Planogram, catalog: Catalog, embedder: Embedder, *, top_k: int = 5,
) -> list[FacingVerdict]:
    """Every slot of one frame judged at the catalogue's operating point, on the CPU (the offline
    path, for reports and the demo; the service crops, embeds and matches in its own stages)."""
    pixels = facing_pixels(image, planogram, embedder.input_size)
    scores = Matcher(catalog, device=torch.device("cpu")).scores(embedder.embed(pixels))
    return judge(scores, catalog.skus, planogram.skus(), [s.id for s in planogram.slots],
                 calibration=catalog.compliance, top_k=top_k)


def with_empty_entry(
    catalog: Catalog, embedder: Embedder, folder: Path, *, count: int = 60, seed: int = EMPTY_REFERENCE_SEED,
) -> Catalog:
    """``catalog`` with the reserved :data:`~catalog.planogram.EMPTY_SKU` entry: ``count`` crops of
    generated empty bays (synthetic, see :func:`empty_patches`) written as PNGs under ``folder`` (they
    are the entry's references, kept like any other) and embedded with the catalogue's model."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, patch in enumerate(empty_patches(count, seed=seed, size=embedder.input_size)):
        path = folder / f"empty-{seed}-{i:03d}.png"
        patch.save(path)
        paths.append(path)
    refs = [Reference(path=p, sku=EMPTY_SKU) for p in paths]
    return add_references(catalog, refs, embedder=embedder, progress=False).catalog


def photo_halves(photos: Mapping[str, Sequence[Path]]) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Each product's photos split in two (alternately, in sorted order): frames composed from one
    half share no photo with frames composed from the other."""
    first = {sku: list(paths[0::2]) for sku, paths in photos.items()}
    second = {sku: list(paths[1::2]) for sku, paths in photos.items()}
    return first, second


def calibrate_on_frames(
    catalog: Catalog, embedder: Embedder, photos: Mapping[str, Sequence[Path]], *, frames: int,
    seed: int = CALIBRATION_SEED, target_precision: float = 0.95, empty_folder: Path | None = None,
    empty_references: int = 60, confidence: float = CALIBRATION_CONFIDENCE,
) -> tuple[Catalog, LabelledFacings]:
    """``catalog`` with its compliance operating point chosen on ``frames`` composed frames (and the
    empty entry added first, its references under ``empty_folder``, when it has none)."""
    if EMPTY_SKU not in catalog.skus:
        if empty_folder is None:
            raise ValueError(f"the catalogue has no {EMPTY_SKU} entry: give a folder for its references")
        catalog = with_empty_entry(catalog, embedder, empty_folder, count=empty_references)
    labelled = labelled_facings(compose_frames(photos, frames, seed=seed), catalog, embedder)
    try:
        point = calibrate_compliance(labelled.scores, catalog.skus, labelled.expected, labelled.truth,
                                     target_precision=target_precision, confidence=confidence)
    except ValueError as exc:
        raise CatalogError(f"{exc} ({len(labelled.truth)} facings of {frames} frames; try more frames)") from exc
    return replace(catalog, compliance=point), labelled


@dataclass(frozen=True)
class ComplianceEvaluation:
    stored: ComplianceQuality  # at the catalogue's operating point (DEFAULT_COMPLIANCE without one)
    default_rule: ComplianceQuality  # expected product best, empty entry best: no calibration
    # calibrated on one photo half, measured on the other; None where that half's facings reach no
    # operating point (too few wrong-product facings for the confidence asked)
    cross_validated: tuple[ComplianceQuality | None, ...]
    # Gaps without the empty entry: "the best product scores below t", t chosen on one photo half
    # (highest recall at 98% precision), (precision, recall) of empty measured on the other.
    empty_by_threshold: tuple[tuple[float | None, float | None], ...]
    frames: int
    facings: int


def _evaluation_frames(photos: Mapping[str, Sequence[Path]], frames: int, seed: int) -> list[list[ShelfFrame]]:
    halves = photo_halves(photos)
    return [compose_frames(half, frames // 2 + (frames % 2 if i == 0 else 0), seed=seed * 2 + i)
            for i, half in enumerate(halves)]


def evaluation_sample(photos: Mapping[str, Sequence[Path]], seed: int = EVALUATION_SEED) -> ShelfFrame:
    """The first frame :func:`evaluate_on_frames` composes (to render one)."""
    return _evaluation_frames(photos, 1, seed)[0][0]


def evaluate_on_frames(
    catalog: Catalog, embedder: Embedder, photos: Mapping[str, Sequence[Path]], *, frames: int,
    seed: int = EVALUATION_SEED, target_precision: float = 0.95,
) -> ComplianceEvaluation:
    """Compliance quality on ``frames`` composed frames: half from each photo half, so that a
    2-fold cross-validation by photo comes from the same embeddings."""
    parts = _evaluation_frames(photos, frames, seed)
    facings = [labelled_facings(part, catalog, embedder) for part in parts]
    every = LabelledFacings(
        scores=np.concatenate([f.scores for f in facings]), expected=sum((f.expected for f in facings), ()),
        truth=sum((f.truth for f in facings), ()), frame=np.concatenate([f.frame for f in facings]),
    )

    def measured(part: LabelledFacings, point: ComplianceCalibration) -> ComplianceQuality:
        fs = facing_scores(part.scores, catalog.skus, part.expected)
        return compliance_quality(statuses(fs, point), part.truth)

    folds: list[ComplianceQuality | None] = []
    by_threshold: list[tuple[float | None, float | None]] = []
    for fit, held in ((facings[0], facings[1]), (facings[1], facings[0])):
        by_threshold.append(_empty_by_threshold(fit, held, catalog.skus))
        try:
            point = calibrate_compliance(fit.scores, catalog.skus, fit.expected, fit.truth,
                                         target_precision=target_precision)
        except ValueError:
            folds.append(None)
            continue
        folds.append(measured(held, point))
    return ComplianceEvaluation(
        stored=measured(every, catalog.compliance or DEFAULT_COMPLIANCE),
        default_rule=measured(every, DEFAULT_COMPLIANCE), cross_validated=tuple(folds),
        empty_by_threshold=tuple(by_threshold),
        frames=sum(len(p) for p in parts), facings=len(every.truth),
    )


def _empty_by_threshold(
    fit: LabelledFacings, held: LabelledFacings, skus: Sequence[str]
) -> tuple[float | None, float | None]:
    """Empty precision and recall on ``held`` of a threshold on the best real product's score alone
    (no empty entry), chosen on ``fit``."""
    def best_and_empty(part: LabelledFacings) -> tuple[np.ndarray, np.ndarray]:
        fs = facing_scores(part.scores, skus, part.expected)
        return fs.best, np.array([t is FacingStatus.EMPTY for t in part.truth])

    best, empty = best_and_empty(fit)
    point = best_threshold(-best, empty, 0.98)
    if point is None:
        return None, None
    best, empty = best_and_empty(held)
    flagged = -best >= point[0]
    hit = int((flagged & empty).sum())
    return (hit / int(flagged.sum()) if flagged.any() else None), (hit / int(empty.sum()) if empty.any() else None)
