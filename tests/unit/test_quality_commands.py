"""`shelfmatch eval` and `shelfmatch catalog calibrate` on the demo photos, with the real model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from catalog.preprocess import decode
from catalog.store import Catalog
from consumer.app import load_model
from consumer.cli import main
from consumer.settings import Settings
from tests.photos import PHOTOS, REFERENCES


def test_eval_reports_table3_for_the_cnn_and_both_baselines(tmp_path):
    code = main(["eval", "--references", str(REFERENCES), "--models", "efficientnet_lite0", "--queries", str(PHOTOS),
                 "--methods", "histogram,phash", "--thresholds", "0.6,0.7,0.8", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    by_method = {m["method"].split(" ")[0]: m for m in report["methods"]}
    assert set(by_method) == {"efficientnet_lite0", "histogram", "phash"}
    cnn, hist, phash = by_method["efficientnet_lite0"], by_method["histogram"], by_method["phash"]
    assert [row["threshold"] for row in cnn["table"]] == [0.6, 0.7, 0.8]
    assert cnn["top1"] >= 0.8 > hist["top1"] > phash["top1"]  # the research's ordering of methods
    recalls = [row["recall"] for row in cnn["table"]]
    assert recalls == sorted(recalls, reverse=True)  # a higher threshold never finds more
    for png in report["plots"]:
        assert (tmp_path / png.split("/")[-1]).stat().st_size > 10_000


def test_calibration_is_stored_and_used_by_the_consumer_unless_overridden(tmp_path, grocery_catalog):
    out = tmp_path / "calibrated.safetensors"
    code = main(["catalog", "calibrate", "--catalog", str(grocery_catalog[1]), "--queries", str(PHOTOS),
                 "--target-precision", "0.95", "--out", str(out), "--device", "cpu"])
    assert code == 0
    catalog = Catalog.load(out)
    assert catalog.calibration is not None
    assert catalog.version == grocery_catalog[0].version  # same vectors: calibration is not content

    model = load_model(Settings(catalog=out), catalog, torch.device("cpu"))
    assert model.matcher.threshold == catalog.calibration.threshold
    assert model.matcher.min_margin == catalog.calibration.min_margin
    overridden = load_model(Settings(catalog=out, threshold=0.5, min_margin=0.01), catalog, torch.device("cpu"))
    assert (overridden.matcher.threshold, overridden.matcher.min_margin) == (0.5, 0.01)


def test_train_head_learns_from_augmented_views_but_keeps_one_catalogue_row_per_reference(
    tmp_path, monkeypatch, grocery_catalog
):
    monkeypatch.chdir(tmp_path)  # the CLI's feature cache is relative to the working folder
    base, path = grocery_catalog
    plain, augmented = tmp_path / "plain.safetensors", tmp_path / "augmented.safetensors"
    common = ["catalog", "train-head", "--catalog", str(path), "--dim", "32", "--epochs", "5", "--device", "cpu"]
    assert main([*common, "--out", str(plain), "--augment", "0"]) == 0
    assert main([*common, "--out", str(augmented), "--augment", "2"]) == 0
    plain_c, aug_c = Catalog.load(plain), Catalog.load(augmented)
    assert aug_c.references == base.references and len(aug_c.row_sku) == len(base.row_sku)
    np.testing.assert_array_equal(aug_c.row_sku, base.row_sku)
    assert aug_c.fingerprint.head and aug_c.fingerprint.head != plain_c.fingerprint.head  # the views changed the head
    # one cache entry for the references and one per view seed
    assert len(list((tmp_path / ".cache" / "features").glob("*.npy"))) == 3


@pytest.mark.parametrize("sizes,scales", [("288", ()), ("160,288", (160, 288))])
def test_a_catalogue_built_at_another_input_size_keeps_it_through_train_head_and_the_consumer(
    tmp_path, monkeypatch, sizes, scales,
):
    """The size is part of the fingerprint: the head is trained on, and the consumer embeds at, that
    size; with several sizes the consumer decodes at the largest and joins the features of each."""
    monkeypatch.chdir(tmp_path)
    built, headed = tmp_path / "288.safetensors", tmp_path / "288-head.safetensors"
    assert (
        main(
            [
                "catalog",
                "build",
                "--images",
                str(REFERENCES),
                "--model",
                "efficientnet_lite0",
                "--input-size",
                sizes,
                "--device",
                "cpu",
                "--out",
                str(built),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "catalog",
                "train-head",
                "--catalog",
                str(built),
                "--dim",
                "32",
                "--epochs",
                "2",
                "--device",
                "cpu",
                "--out",
                str(headed),
            ]
        )
        == 0
    )
    for path in (built, headed):
        catalog = Catalog.load(path)
        assert catalog.fingerprint.preprocessing.size == (288, 288) and catalog.fingerprint.scales == scales
        with safe_open(str(path), "np") as f:  # readers that know nothing of joined sizes refuse the file
            assert json.loads(f.metadata()["shelfmatch"])["format"] == f"shelfmatch-catalog/{2 if scales else 1}"
        model = load_model(Settings(catalog=path, threshold=0.7), catalog, torch.device("cpu"))  # refuses a mismatch
        assert model.embedder.input_size == (288, 288) and model.embedder.fingerprint == catalog.fingerprint
        # The consumer's runtime finds a reference photo as itself: the catalogue's vectors and the
        # live ones are made the same way at every size.
        first = Path(catalog.references[0])
        pixels = decode(first.read_bytes(), model.embedder.input_size).pixels.unsqueeze(0)
        [found] = model.matcher.match(model.embedder.embed(pixels))
        assert found.best[0] == catalog.skus[catalog.row_sku[0]] and found.best[1] > 0.999
    # global pooling: the same dimension at any size, once per size
    assert Catalog.load(built).fingerprint.dim == 1280 * max(1, len(scales))


def test_an_input_size_that_is_not_a_number_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["catalog", "build", "--images", str(REFERENCES), "--model", "efficientnet_lite0",
              "--input-size", "224,big", "--out", "x.safetensors"])
    assert "not a size in pixels" in capsys.readouterr().err


def test_compliance_is_calibrated_into_the_catalogue_then_evaluated_and_rendered(tmp_path, grocery_catalog):
    out = tmp_path / "compliance.safetensors"
    code = main(["catalog", "calibrate-compliance", "--catalog", str(grocery_catalog[1]), "--photos", str(PHOTOS),
                 "--frames", "3", "--empty-references", "6", "--target-precision", "0.8", "--confidence", "0",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    catalog = Catalog.load(out)
    assert catalog.compliance is not None and "__empty__" in catalog.skus
    assert len(list((tmp_path / "compliance.empty").glob("*.png"))) == 6
    assert Catalog.load(grocery_catalog[1]).compliance is None  # --out wrote a copy

    code = main(["eval", "--compliance", "--catalog", str(out), "--photos", str(PHOTOS), "--frames", "2",
                 "--device", "cpu", "--out", str(tmp_path / "report")])
    assert code == 0
    report = json.loads((tmp_path / "report" / "compliance.json").read_text())
    assert report["compliance"]["min_lead"] == catalog.compliance.min_lead
    assert report["facings"] == 48 and report["stored"]["facings"] == 48
    assert report["stored"]["empty_recall"] in (None, 1.0)  # generated empties are easy (docs/quality.md)
    assert (tmp_path / "report" / "compliance-frame.png").stat().st_size > 10_000


def test_a_confidence_below_one_half_or_at_one_is_refused():
    import argparse

    from consumer.cli import _confidence

    assert _confidence("0") == 0.0 and _confidence("0.99") == 0.99
    for bad in ("0.3", "1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            _confidence(bad)


def test_calibrate_compliance_defaults_to_the_confidence_the_library_calibrates_with():
    from catalog.compliance import CALIBRATION_CONFIDENCE
    from consumer.cli import parser

    args = parser().parse_args(["catalog", "calibrate-compliance", "--catalog", "c.safetensors"])
    assert args.confidence == CALIBRATION_CONFIDENCE
