"""Per-facing verdicts, the frame summary, calibration of the operating point, quality, rendering."""
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from catalog.compliance import (
    DEFAULT_COMPLIANCE,
    FacingStatus,
    best_threshold,
    calibrate_compliance,
    compliance_quality,
    format_quality,
    judge,
    summarise,
)
from catalog.planogram import EMPTY_SKU, Planogram, Region, Slot
from catalog.render import COLOURS, render_compliance
from catalog.store import Catalog, ComplianceCalibration
from tests.photos import photo, store_photos
from tests.unit.test_matcher import random_catalog

SKUS = ("Banana", "Kiwi", "Pineapple", EMPTY_SKU)
OK, WRONG, EMPTY, UNKNOWN = FacingStatus.OK, FacingStatus.WRONG_PRODUCT, FacingStatus.EMPTY, FacingStatus.UNKNOWN


def verdicts(rows, expected, calibration=None):
    return judge(np.array(rows), SKUS, expected, [f"s{i}" for i in range(len(rows))], calibration=calibration)


def test_each_status_follows_the_documented_rule():
    got = verdicts(
        [[0.90, 0.50, 0.40, 0.10],  # expected best by far: ok
         [0.50, 0.80, 0.30, 0.20],  # another product far ahead: wrong-product
         [0.30, 0.30, 0.30, 0.90],  # empty entry best: empty
         [0.10, 0.12, 0.05, 0.00]],  # nothing looks like it (with unknown_below 0.3): unknown
        ["Banana", "Banana", "Kiwi", "Banana"],
        calibration=ComplianceCalibration(min_lead=-0.05, min_score=0.0, unknown_below=0.3),
    )
    assert [v.status for v in got] == [OK, WRONG, EMPTY, UNKNOWN]
    assert got[1].expected_score == 0.5 and got[1].margin == pytest.approx(-0.3)
    assert got[1].seen == "Kiwi" and got[0].seen == "Banana" and got[2].seen is None
    assert got[0].candidates[0] == ("Banana", 0.9) and len(got[0].candidates) == 4
    assert got[2].empty_score == 0.9


def test_a_negative_min_lead_accepts_the_expected_product_just_behind_a_look_alike():
    row = [[0.70, 0.72, 0.10, 0.00]]
    assert verdicts(row, ["Banana"])[0].status is WRONG  # default: expected must be best
    assert verdicts(row, ["Banana"], ComplianceCalibration(min_lead=-0.05, min_score=-1))[0].status is OK
    assert verdicts(row, ["Banana"], ComplianceCalibration(min_lead=-0.05, min_score=0.8))[0].status is WRONG


def test_the_margin_ignores_the_empty_entry_and_an_expected_sku_missing_from_the_catalogue_is_unknown():
    got = verdicts([[0.60, 0.40, 0.10, 0.55], [0.9, 0.1, 0.1, 0.1]], ["Banana", "Durian"])
    assert got[0].status is OK and got[0].margin == pytest.approx(0.2)
    assert got[1].status is UNKNOWN and got[1].expected_score is None and got[1].margin is None


def test_the_summary_counts_statuses_scores_compliance_and_share_of_shelf():
    got = verdicts(
        [[0.9, 0.1, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9],
         [0.05, 0.05, 0.05, 0.0]],
        ["Banana", "Banana", "Banana", "Kiwi", "Kiwi"],
        calibration=replace(DEFAULT_COMPLIANCE, unknown_below=0.3),
    )
    summary = summarise(got, "v7")
    assert dict(summary.counts) == {"ok": 2, "wrong-product": 1, "empty": 1, "unknown": 1}
    assert summary.compliance == 0.5  # 2 ok of the 4 facings that could be judged
    assert dict(summary.share_of_shelf) == pytest.approx({"Banana": 2 / 3, "Kiwi": 1 / 3})
    assert summarise(got[4:], "v7").compliance is None


def labelled_scores(n: int, seed: int = 0):
    """Facings whose expected product wins by a noisy lead when ok, loses when wrong; empties
    score high on the empty entry. Truth is known, so calibration can be checked."""
    rng = np.random.default_rng(seed)
    truth = [(OK, WRONG, EMPTY)[k] for k in rng.choice(3, size=n, p=[0.75, 0.15, 0.10])]
    scores = rng.uniform(0.2, 0.5, size=(n, len(SKUS)))
    expected = ["Banana"] * n
    for i, t in enumerate(truth):
        if t is OK:
            scores[i, 0] = 0.75 + rng.normal(0, 0.05)
            scores[i, 1] = scores[i, 0] + rng.normal(-0.08, 0.05)  # a look-alike, sometimes ahead
        elif t is WRONG:
            scores[i, 1] = 0.8 + rng.normal(0, 0.05)
            scores[i, 0] = scores[i, 1] - abs(rng.normal(0.15, 0.08))
        else:
            scores[i, 3] = 0.9
    return scores, expected, truth


def test_calibration_reaches_the_target_precision_where_the_default_rule_does_not():
    scores, expected, truth = labelled_scores(3000, seed=1)
    point = calibrate_compliance(scores, SKUS, expected, truth, target_precision=0.95)
    assert point.min_lead < 0
    held_scores, held_expected, held_truth = labelled_scores(3000, seed=2)
    ids = [str(i) for i in range(len(held_truth))]
    calibrated = compliance_quality([v.status for v in judge(held_scores, SKUS, held_expected, ids,
                                                            calibration=point)], held_truth)
    default = compliance_quality([v.status for v in judge(held_scores, SKUS, held_expected, ids)], held_truth)
    assert calibrated.wrong_precision is not None and calibrated.wrong_precision >= 0.93
    assert default.wrong_precision is not None and default.wrong_precision < 0.9
    assert calibrated.empty_precision == calibrated.empty_recall == 1.0
    assert "wrong-product precision" in format_quality("held out", calibrated)


def test_calibration_refuses_a_target_no_operating_point_reaches():
    scores = np.array([[0.9, 0.8, 0.1, 0.0]] * 10)
    truth = [OK, WRONG] * 5  # identical rows, half right: no threshold separates them
    with pytest.raises(ValueError, match="precision"):
        calibrate_compliance(scores, SKUS, ["Banana"] * 10, truth, target_precision=0.95)


def test_a_confident_operating_point_needs_enough_facings_and_keeps_a_margin():
    """At confidence 0.99 the precision's lower bound must reach the target: a perfect separation
    of 40 wrong-product facings is not enough evidence, one of 200 is; and with overlapping scores
    the point chosen is stricter than the observed 95% boundary."""
    def separated(n_wrong: int) -> tuple[np.ndarray, np.ndarray]:
        values = np.concatenate([np.linspace(1.0, 2.0, n_wrong), np.linspace(-1.0, 0.0, 500)])
        return values, np.arange(len(values)) < n_wrong

    assert best_threshold(*separated(40), 0.95) is not None
    assert best_threshold(*separated(40), 0.95, confidence=0.99) is None
    assert best_threshold(*separated(200), 0.95, confidence=0.99) is not None
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(1.0, 0.5, 300), rng.normal(-1.0, 0.5, 3000)])
    positive = np.arange(len(values)) < 300
    observed = best_threshold(values, positive, 0.95)
    confident = best_threshold(values, positive, 0.95, confidence=0.99)
    assert observed is not None and confident is not None
    assert confident[0] > observed[0] and confident[1] > observed[1] >= 0.95


def test_quality_counts_ok_facings_flagged_as_anything_else():
    q = compliance_quality([OK, WRONG, UNKNOWN, EMPTY, WRONG], [OK, OK, OK, EMPTY, WRONG])
    assert q.ok_flagged == pytest.approx(2 / 3)
    assert q.wrong_precision == 0.5 and q.wrong_recall == 1.0 and q.unknown == 1
    assert q.meets()["ok_flagged"] is False and q.meets()["empty_recall"] is True


def test_the_operating_point_is_stored_with_the_catalogue(tmp_path):
    catalog = replace(random_catalog(products=3, refs_per_product=1),
                      compliance=ComplianceCalibration(min_lead=-0.04, min_score=0.5, empty_margin=0.1))
    catalog.save(tmp_path / "c.safetensors")
    loaded = Catalog.load(tmp_path / "c.safetensors")
    assert loaded.compliance == catalog.compliance
    assert "min lead -0.040" in loaded.summary()
    replace(catalog, compliance=None).save(tmp_path / "d.safetensors")
    assert Catalog.load(tmp_path / "d.safetensors").compliance is None


def test_the_rendered_frame_tints_each_slot_by_its_status_and_adds_a_legend():
    frame = Image.new("RGB", (400, 200), (255, 255, 255))
    frame.paste(photo(store_photos()[0][0]).resize((200, 200)), (0, 0))
    planogram = Planogram(camera_id="cam-1", version="v7", slots=(
        Slot(id="a", region=Region(x0=0, y0=0, x1=0.5, y1=1), sku="Banana", row=0, position=0),
        Slot(id="b", region=Region(x0=0.5, y0=0, x1=1, y1=1), sku="Kiwi", row=0, position=1),
    ))
    got = verdicts([[0.1, 0.9, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9]], ["Banana", "Kiwi"])
    got = [replace(v, slot_id=s) for v, s in zip(got, ["a", "b"], strict=True)]
    out = render_compliance(frame, planogram, got)
    assert out.width == 400 and out.height > 200  # the legend strip below
    red, amber = COLOURS[WRONG], COLOURS[EMPTY]
    assert out.getpixel((0, 100)) == pytest.approx(red, abs=40)  # outline of the wrong facing
    inner = np.asarray(out.crop((300, 80, 380, 120)), dtype=float).mean(axis=(0, 1))
    white_tinted = 255 + (np.array(amber) - 255) * 70 / 255
    assert inner == pytest.approx(white_tinted, abs=3)  # the empty facing's tint over white
    assert frame.getpixel((300, 100)) == (255, 255, 255)  # the input is left as it was
