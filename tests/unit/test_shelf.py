"""Composed shelf frames: deterministic, true to their planogram and ground truth, and the crops
that the evaluation embeds (demo val photos, a small bay)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.build import Reference, build_catalog
from catalog.compliance import FacingStatus
from catalog.embedder import Embedder
from catalog.models import backbone_of
from catalog.planogram import EMPTY_SKU, Planogram, Region, Slot
from catalog.shelf import (
    BayLayout,
    compose_frame,
    compose_frames,
    empty_patches,
    facing_pixels,
    judge_frame,
    labelled_facings,
    photo_halves,
    with_empty_entry,
)
from tests.photos import store_photos

SMALL = BayLayout(width=480, height=320, rows=2, facings=4, wrong_rate=0.25, empty_rate=0.25)


@pytest.fixture(scope="module")
def photos() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path, sku in store_photos():  # the demo's store photos are the dataset's val photos
        out.setdefault(sku, []).append(path)
    return out


def test_the_same_seed_gives_the_same_frame_planogram_and_truth(photos):
    a, b = compose_frame(photos, seed=5, layout=SMALL), compose_frame(photos, seed=5, layout=SMALL)
    assert a.planogram == b.planogram and a.truth == b.truth
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = compose_frame(photos, seed=6, layout=SMALL)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_a_frame_follows_its_layout_and_its_planogram_validates(photos):
    frame = compose_frame(photos, seed=1, layout=SMALL)
    assert frame.image.size == (480, 320)
    assert isinstance(frame.planogram, Planogram) and len(frame.planogram.slots) == 8
    assert [t.slot_id for t in frame.truth] == [s.id for s in frame.planogram.slots]
    assert {s.row for s in frame.planogram.slots} == {0, 1}
    assert set(frame.planogram.skus()) <= set(photos)


def test_truth_says_what_each_slot_shows(photos):
    frames = compose_frames(photos, 12, seed=3, layout=SMALL)
    truth = [t for f in frames for t in f.truth]
    counts = Counter(t.status for t in truth)
    assert set(counts) == {FacingStatus.OK, FacingStatus.WRONG_PRODUCT, FacingStatus.EMPTY}
    for t in truth:
        if t.status is FacingStatus.OK:
            assert t.shown == t.expected and t.photo is not None and Path(t.photo).parent.name == t.expected
        elif t.status is FacingStatus.WRONG_PRODUCT:
            assert t.shown != t.expected and t.photo is not None and Path(t.photo).parent.name == t.shown
        else:
            assert t.shown is None and t.photo is None


def test_an_empty_slot_shows_the_bay_and_a_filled_one_shows_a_photo(photos):
    frame = compose_frame(photos, seed=4, layout=SMALL)
    pixels = facing_pixels(frame.image, frame.planogram, (64, 64)).float()
    assert pixels.shape == (8, 3, 64, 64)
    spread = pixels.std(dim=(1, 2, 3))  # a generated panel is far flatter than a store photo
    empty = [i for i, t in enumerate(frame.truth) if t.status is FacingStatus.EMPTY]
    filled = [i for i, t in enumerate(frame.truth) if t.status is not FacingStatus.EMPTY]
    assert empty and filled
    assert spread[empty].max() < spread[filled].min()


def test_a_slot_given_as_corners_is_rectified_like_its_box(photos):
    frame = compose_frame(photos, seed=4, layout=SMALL)
    slot = frame.planogram.slots[0]
    cornered = Slot(id="q", region=Region.from_corners(slot.region.quad()), sku=slot.sku, row=0, position=0)
    boxed = facing_pixels(frame.image, frame.planogram.model_copy(update={"slots": (slot,)}), (32, 32))
    rectified = facing_pixels(frame.image, frame.planogram.model_copy(update={"slots": (cornered,)}), (32, 32))
    assert (boxed.float() - rectified.float()).abs().mean() < 8


def test_empty_patches_are_deterministic_and_photo_halves_share_no_photo(photos):
    a, b = empty_patches(3, seed=11, size=(32, 32)), empty_patches(3, seed=11, size=(32, 32))
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]
    first, second = photo_halves(photos)
    for sku in photos:
        assert not set(first[sku]) & set(second[sku])
        assert sorted(first[sku] + second[sku]) == sorted(photos[sku])


def test_labelled_facings_match_every_crop_against_a_catalogue_with_the_empty_entry(photos, tmp_path):
    # Random weights: only the wiring is checked (crop -> embed -> Matcher.scores, the empty entry).
    refs = [Reference(path=paths[0], sku=sku) for sku, paths in photos.items()]
    catalog = build_catalog(refs, model="mobilenet_v3_small", weights="none", device="cpu", progress=False)
    embedder = Embedder(backbone_of(catalog.fingerprint, "none"), "cpu")
    with_empty = with_empty_entry(catalog, embedder, tmp_path / "empty", count=3)
    assert with_empty.skus.count(EMPTY_SKU) == 1 and len(list((tmp_path / "empty").glob("*.png"))) == 3
    frames = compose_frames(photos, 2, seed=9, layout=SMALL)
    got = labelled_facings(frames, with_empty, embedder)
    assert got.scores.shape == (16, len(with_empty.skus))
    assert np.all(got.scores <= 1.0 + 1e-4) and torch.isfinite(torch.from_numpy(got.scores)).all()
    assert list(got.frame) == [0] * 8 + [1] * 8
    assert got.truth == tuple(t.status for f in frames for t in f.truth)
    verdicts = judge_frame(frames[0].image, frames[0].planogram, with_empty, embedder)
    assert [v.slot_id for v in verdicts] == [s.id for s in frames[0].planogram.slots]
    assert [v.expected for v in verdicts] == list(frames[0].planogram.skus())


def test_calibration_photos_are_train_photos_that_are_not_references_even_as_copies(tmp_path):
    """A tiny dataset in the Grocery Store layout: two products with three train photos each; the
    catalogue holds a copy of one of them under another name. Calibration gets the other five."""
    from dataclasses import replace

    from catalog.errors import CatalogError
    from catalog.shelf import calibration_photos
    from tests.unit.test_matcher import random_catalog

    dataset = tmp_path / "grocery"
    skus = ("Banana", "Kiwi")
    rows = []
    demo = Path(__file__).resolve().parents[2] / "data" / "grocery-demo" / "references"
    for k, sku in enumerate(skus):
        for i, src in enumerate(sorted((demo / sku).glob("*_00*.jpg"))[:3]):
            path = dataset / "train" / sku / f"{sku}_{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(src.read_bytes())
            rows.append(f"train/{sku}/{path.name}, {k}, {k}")
    (dataset / "train.txt").write_text("\n".join(rows) + "\n")
    (dataset / "val.txt").write_text("")
    classes = "".join(f"{s},{k},{s},{k},/x/{s}.jpg,/x/{s}.txt\n" for k, s in enumerate(skus))
    (dataset / "classes.csv").write_text("name,id,coarse,coarse id,iconic,description\n" + classes)
    copy = tmp_path / "refs" / "renamed.jpg"
    copy.parent.mkdir()
    copy.write_bytes((dataset / "train" / "Kiwi" / "Kiwi_001.jpg").read_bytes())
    catalog = replace(random_catalog(products=2, refs_per_product=1), skus=skus, references=(str(copy), str(copy)))
    photos = calibration_photos(dataset, catalog)
    assert {sku: [p.name for p in paths] for sku, paths in photos.items()} == {
        "Banana": ["Banana_000.jpg", "Banana_001.jpg", "Banana_002.jpg"], "Kiwi": ["Kiwi_000.jpg", "Kiwi_002.jpg"]}
    gone = replace(catalog, references=(str(copy), str(tmp_path / "refs" / "moved.jpg")))
    with pytest.raises(CatalogError, match="cannot be read"):
        calibration_photos(dataset, gone)
