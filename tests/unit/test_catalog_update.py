"""`catalog add` / `catalog remove`: new versions without a rebuild, on small real images."""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from catalog.build import Reference, build_catalog, catalog_from_vectors, embed_images
from catalog.embedder import Embedder
from catalog.errors import CatalogError, FingerprintMismatchError
from catalog.head import project, train_head
from catalog.models import load_backbone
from catalog.store import Calibration, Catalog
from catalog.update import add_references, model_of, remove
from consumer.cli import main
from tests.photos import REFERENCES

MODEL = "mobilenet_v3_small"  # the smallest backbone; random weights, so nothing downloads


def refs(*skus: str, per_sku: int = 3) -> list[Reference]:
    return [Reference(p, sku) for sku in skus for p in sorted((REFERENCES / sku).glob("*.jpg"))[:per_sku]]


@pytest.fixture(scope="module")
def base() -> Catalog:
    catalog = build_catalog(refs("Banana", "Kiwi"), model=MODEL, weights="none", device="cpu", progress=False)
    return replace(catalog, calibration=Calibration(threshold=0.8, min_margin=0.02))


def test_add_embeds_only_the_new_references_and_matches_a_full_build(base, caplog):
    new = refs("Aubergine") + refs("Kiwi", per_sku=4)[3:]  # a new SKU, and a 4th image of a known one
    given = refs("Banana")[:1] + new  # one the catalogue already holds
    with caplog.at_level(logging.WARNING):
        change = add_references(base, given, embedder=model_of(base, "cpu"), progress=False)
    added = change.catalog
    assert (change.rows_added, change.skipped, change.skus_added) == (4, 1, ("Aubergine",))
    assert added.skus == ("Aubergine", "Banana", "Kiwi") and len(added.row_sku) == 10
    # The old rows are the old vectors, not recomputed: byte for byte.
    assert added.embeddings[:6].tobytes() == base.embeddings.tobytes()
    assert [added.skus[i] for i in added.row_sku[:6]] == [base.skus[i] for i in base.row_sku]
    full = build_catalog(refs("Banana", "Kiwi") + new, model=MODEL, weights="none", device="cpu", progress=False)
    np.testing.assert_allclose(added.embeddings, full.embeddings, atol=1e-5)
    assert [added.skus[i] for i in added.row_sku] == [full.skus[i] for i in full.row_sku]
    assert added.references == full.references
    assert added.version != base.version and added.fingerprint == base.fingerprint
    assert added.calibration == base.calibration
    assert "calibrate" in caplog.text  # says the calibration may need a refresh


def test_adding_only_known_references_changes_nothing(base):
    change = add_references(base, refs("Banana"), embedder=model_of(base, "cpu"), progress=False)
    assert change.catalog is base and change.skipped == 3 and change.rows_added == 0


def test_remove_a_sku_and_a_reference(base):
    without_kiwi = remove(base, skus=["Kiwi"]).catalog
    assert without_kiwi.skus == ("Banana",) and len(without_kiwi.row_sku) == 3
    np.testing.assert_array_equal(without_kiwi.embeddings, base.embeddings[:3])
    first = base.references[0]
    one_less = remove(base, references=[first])
    assert one_less.rows_removed == 1 and first not in one_less.catalog.references
    assert one_less.catalog.skus == base.skus  # Banana keeps two references
    assert one_less.catalog.calibration == base.calibration
    assert len({base.version, without_kiwi.version, one_less.catalog.version}) == 3


def test_remove_refuses_unknown_names_and_an_empty_catalogue(base):
    with pytest.raises(CatalogError, match="not in the catalogue: Mango"):
        remove(base, skus=["Mango"])
    with pytest.raises(CatalogError, match="references are not in the catalogue"):
        remove(base, references=["/nowhere.jpg"])
    with pytest.raises(CatalogError, match="every reference"):
        remove(base, skus=["Banana", "Kiwi"])


def test_add_keeps_the_projection_head_and_embeds_through_it(tmp_path):
    backbone = load_backbone(MODEL, weights="none")
    start = refs("Banana", "Kiwi", per_sku=2)
    features = embed_images([r.path for r in start], Embedder(backbone, "cpu"), progress=False)
    head = train_head(features, np.repeat([0, 1], 2), out_dim=16, epochs=1)
    headed = catalog_from_vectors(start, project(head, features), backbone.with_head(head), "none")
    path = tmp_path / "head.safetensors"
    headed.save(path)
    headed = Catalog.load(path)

    change = add_references(headed, refs("Carrots", per_sku=2), embedder=model_of(headed, "cpu"), progress=False)
    assert change.catalog.fingerprint == headed.fingerprint and change.catalog.fingerprint.head
    assert change.catalog.embeddings.shape == (6, 16)
    assert set(change.catalog.head_state or {}) == set(headed.head_state or {})


def test_the_model_must_reproduce_the_fingerprint(base):
    other = Embedder(load_backbone("resnet18", weights="none"), "cpu")
    with pytest.raises(FingerprintMismatchError):
        add_references(base, refs("Carrots"), embedder=other, progress=False)


def test_the_commands_write_new_versions(tmp_path, base, capsys):
    path = tmp_path / "c.safetensors"
    base.save(path)
    images = tmp_path / "new"
    (images / "Carrots").mkdir(parents=True)
    for r in refs("Carrots", per_sku=2):
        (images / "Carrots" / r.path.name).write_bytes(r.path.read_bytes())
    assert main(["catalog", "add", "--catalog", str(path), "--images", str(images), "--device", "cpu"]) == 0
    added = Catalog.load(path)
    assert "Carrots" in added.skus and added.version != base.version
    assert "2 references added (1 new SKUs)" in capsys.readouterr().out
    out = tmp_path / "smaller.safetensors"
    assert main(["catalog", "remove", "--catalog", str(path), "--sku", "Carrots", "--out", str(out)]) == 0
    assert Catalog.load(out).version == base.version  # the same rows as before the add: the same version
    assert main(["catalog", "remove", "--catalog", str(path)]) == 2  # nothing named
