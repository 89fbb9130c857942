"""`shelfmatch eval` and `shelfmatch catalog calibrate` on the demo photos, with the real model."""
import json

import torch

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
