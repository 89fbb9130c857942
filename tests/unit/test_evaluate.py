
import numpy as np
import pytest
import torch

from catalog.evaluate import calibrate, operating_point, product_scores, threshold_table, top_k_accuracy
from catalog.matcher import Matcher
from tests.unit.test_matcher import random_catalog

# 4 photos x 3 products; true products 0, 1, 2, 0.
SCORES = np.array([
    [0.96, 0.91, 0.20],  # right, and a wrong product also passes 0.90
    [0.50, 0.93, 0.40],  # right
    [0.97, 0.10, 0.88],  # wrong best; true product below 0.90
    [0.86, 0.30, 0.20],  # right but below 0.90
])
TRUTH = np.array([0, 1, 2, 0])


def test_threshold_table_counts_recall_and_false_positives_per_true_positive():
    (r85, r90, r99) = threshold_table(SCORES, TRUTH, (0.85, 0.90, 0.99))
    assert r85.recall == 1.0  # all four true products pass 0.85 (0.96, 0.93, 0.88, 0.86)
    assert r85.fp_per_tp == 2 / 4  # 0.91 and 0.97 are wrong products passing
    assert r90.recall == 2 / 4 and r90.fp_per_tp == 2 / 2
    assert r99.recall == 0.0 and r99.fp_per_tp is None  # nothing found: no ratio (JSON null, not NaN)


def test_top_k_accuracy():
    assert top_k_accuracy(SCORES, TRUTH, 1) == 3 / 4
    assert top_k_accuracy(SCORES, TRUTH, 2) == 1.0


def test_operating_point_uses_the_services_verdict_rule():
    point = operating_point(SCORES, TRUTH, threshold=0.9, min_margin=0.0)
    assert (point.matches, point.precision, point.recall) == (3, 2 / 3, 2 / 4)
    strict = operating_point(SCORES, TRUTH, threshold=0.9, min_margin=0.06)  # 0.96 - 0.91 < 0.06
    assert (strict.matches, strict.precision) == (2, 1 / 2)


def test_calibration_maximises_recall_at_the_target_precision():
    # Margins (best - second): 0.05, 0.43, 0.09 (the wrong one), 0.56. Perfect precision needs a
    # margin above 0.09, which also drops photo 0: recall 2/4 at best, threshold down to 0.86.
    point = calibrate(SCORES, TRUTH, target_precision=1.0)
    assert (point.threshold, point.min_margin, point.precision, point.recall) == (0.86, 0.1, 1.0, 0.5)
    # At 75% precision no margin is needed: accept everything down to 0.86 (3 right of 4).
    loose = calibrate(SCORES, TRUTH, target_precision=0.75)
    assert (loose.threshold, loose.min_margin, loose.recall) == (0.86, 0.0, 0.75)
    again = operating_point(SCORES, TRUTH, loose.threshold, loose.min_margin)
    assert (again.precision, again.recall) == (loose.precision, loose.recall)
    with pytest.raises(ValueError):
        calibrate(np.array([[0.1, 0.9]]), np.array([0]), target_precision=0.5)


def test_product_scores_equal_the_matchers():
    catalog = random_catalog(products=12, refs_per_product=3)
    queries = np.random.default_rng(3).normal(size=(9, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ours = product_scores(queries, catalog.embeddings, catalog.row_sku, len(catalog.skus))
    matcher = Matcher(catalog, device=torch.device("cpu")).scores(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(ours, matcher, atol=1e-6)
