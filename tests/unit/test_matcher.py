import numpy as np
import pytest
import torch

from catalog.matcher import Matcher, Verdict, verdict
from catalog.models import Fingerprint, Preprocessing
from catalog.store import Catalog


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_catalog(products: int, refs_per_product: int, dim: int = 64, seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    rows = unit(rng.normal(size=(products * refs_per_product, dim))).astype(np.float32)
    row_sku = np.repeat(np.arange(products), refs_per_product).astype(np.int32)
    rng.shuffle(row_sku)  # rows of a product need not be adjacent
    fp = Fingerprint(backbone="test", weights="none", preprocessing=Preprocessing(), dim=dim)
    return Catalog(
        embeddings=rows, row_sku=row_sku, skus=tuple(f"sku-{i:03d}" for i in range(products)), fingerprint=fp
    )


def reference_scores(catalog: Catalog, queries: np.ndarray) -> np.ndarray:
    """The research's method in float64: S = Xnorm · Ynormᵀ, then a product's best reference."""
    s = unit(queries.astype(np.float64)) @ unit(catalog.embeddings.astype(np.float64)).T
    out = np.full((len(queries), len(catalog.skus)), -np.inf)
    for row, sku in enumerate(catalog.row_sku):
        out[:, sku] = np.maximum(out[:, sku], s[:, row])
    return out


@pytest.mark.parametrize("refs_per_product", [1, 3])
def test_scores_equal_float64_reference(refs_per_product):
    catalog = random_catalog(products=50, refs_per_product=refs_per_product)
    queries = unit(np.random.default_rng(1).normal(size=(17, 64))).astype(np.float32)
    matcher = Matcher(catalog, device=torch.device("cpu"))
    got = matcher.scores(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(got, reference_scores(catalog, queries), atol=1e-5)


def test_top_k_is_the_k_best_products_in_order():
    catalog = random_catalog(products=40, refs_per_product=2)
    queries = unit(np.random.default_rng(2).normal(size=(8, 64))).astype(np.float32)
    expected = reference_scores(catalog, queries)
    matches = Matcher(catalog, device=torch.device("cpu"), top_k=5, threshold=-1).match(torch.from_numpy(queries))
    for row, m in enumerate(matches):
        want = np.argsort(-expected[row])[:5]
        assert [sku for sku, _ in m.candidates] == [catalog.skus[i] for i in want]
        assert [s for _, s in m.candidates] == sorted((s for _, s in m.candidates), reverse=True)


def test_a_reference_matches_its_own_product_with_score_one():
    catalog = random_catalog(products=20, refs_per_product=3)
    matcher = Matcher(catalog, device=torch.device("cpu"), threshold=0.99)
    matches = matcher.match(torch.from_numpy(catalog.embeddings))
    for row, m in enumerate(matches):
        assert m.best[0] == catalog.skus[catalog.row_sku[row]]
        assert m.best[1] == pytest.approx(1.0, abs=1e-5)
        assert m.verdict is Verdict.MATCH


@pytest.mark.parametrize(
    "best,second,threshold,margin,expected",
    [
        (0.95, 0.80, 0.90, 0.05, Verdict.MATCH),
        (0.90, 0.80, 0.90, 0.05, Verdict.MATCH),  # threshold is inclusive
        (0.95, 0.93, 0.90, 0.05, Verdict.AMBIGUOUS),  # above threshold, runner-up too close
        (0.75, 0.50, 0.50, 0.25, Verdict.MATCH),  # margin is inclusive (binary-exact values)
        (0.89, 0.10, 0.90, 0.00, Verdict.UNKNOWN),
        (0.89, 0.88, 0.90, 0.05, Verdict.UNKNOWN),  # below threshold wins over ambiguity
        (0.95, None, 0.90, 0.05, Verdict.MATCH),  # single-product catalogue
    ],
)
def test_verdict_rules(best, second, threshold, margin, expected):
    assert verdict(best, second, threshold, margin) is expected


def test_top_k_larger_than_catalogue_is_clamped():
    catalog = random_catalog(products=3, refs_per_product=1)
    m = Matcher(catalog, device=torch.device("cpu"), top_k=10).match(torch.from_numpy(catalog.embeddings[:1]))
    assert len(m[0].candidates) == 3


def test_empty_batch_gives_no_matches():
    catalog = random_catalog(products=3, refs_per_product=1)
    assert Matcher(catalog, device=torch.device("cpu")).match(torch.zeros((0, 64))) == []


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_margin_is_the_lead_over_the_runner_up_whatever_top_k(top_k):
    catalog = random_catalog(products=30, refs_per_product=2)
    queries = unit(np.random.default_rng(3).normal(size=(6, 64))).astype(np.float32)
    expected = np.sort(reference_scores(catalog, queries), axis=1)[:, ::-1]
    matches = Matcher(catalog, device=torch.device("cpu"), top_k=top_k, threshold=-1).match(torch.from_numpy(queries))
    for row, m in enumerate(matches):
        assert len(m.candidates) == top_k
        assert m.margin == pytest.approx(expected[row, 0] - expected[row, 1], abs=1e-5)
        assert m.margin > 0


def test_margin_is_zero_with_a_single_product():
    catalog = random_catalog(products=1, refs_per_product=2)
    (m,) = Matcher(catalog, device=torch.device("cpu"), top_k=5).match(torch.from_numpy(catalog.embeddings[:1]))
    assert m.margin == 0.0 and len(m.candidates) == 1


def test_the_reserved_empty_entry_is_never_a_whole_photo_match_nor_a_runner_up():
    """Photos of the empty-shelf entry itself still get a real product: __empty__ serves facing
    verdicts (scores) only, never a MatchEvent's candidates or margin."""
    from dataclasses import replace

    from catalog.planogram import EMPTY_SKU

    catalog = random_catalog(products=6, refs_per_product=1)
    catalog = replace(catalog, skus=(*catalog.skus[:5], EMPTY_SKU))
    matcher = Matcher(catalog, device=torch.device("cpu"), top_k=10, threshold=0.5)
    empty_rows = torch.from_numpy(catalog.embeddings[catalog.row_sku == 5])
    scores = matcher.scores(empty_rows)
    assert scores[0, 5] == pytest.approx(1.0, abs=1e-5)  # the entry is there for judge()
    for m in matcher.match(empty_rows):
        assert EMPTY_SKU not in {sku for sku, _ in m.candidates}
        assert len(m.candidates) == 5
