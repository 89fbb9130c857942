import json
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save_file

from catalog.errors import CatalogFileError
from catalog.store import Calibration, Catalog
from tests.unit.test_matcher import random_catalog


def test_round_trip_keeps_everything(tmp_path):
    catalog = replace(random_catalog(products=7, refs_per_product=2), calibration=Calibration(0.8, 0.03))
    path = tmp_path / "c.safetensors"
    catalog.save(path)
    loaded = Catalog.load(path)
    np.testing.assert_array_equal(loaded.embeddings, catalog.embeddings)
    np.testing.assert_array_equal(loaded.row_sku, catalog.row_sku)
    assert loaded.skus == catalog.skus
    assert loaded.fingerprint == catalog.fingerprint
    assert loaded.version == catalog.version
    assert loaded.created_at == catalog.created_at
    assert loaded.calibration == Calibration(0.8, 0.03)


def test_large_tensors_are_read_in_slices_with_nothing_lost(tmp_path, monkeypatch):
    """A catalogue far larger than one read slice (and not a whole number of slices) loads exactly:
    the slices are there so that no single copy holds the GIL for long during a live swap."""
    import catalog.store as store

    catalog = random_catalog(products=13, refs_per_product=3)
    row_bytes = catalog.embeddings.shape[1] * 4
    monkeypatch.setattr(store, "READ_SLICE_BYTES", 4 * row_bytes + 1)  # 4 rows a slice, 39 rows
    path = tmp_path / "c.safetensors"
    catalog.save(path)
    reads: list[tuple[str, int, int]] = []
    real_open = store.safe_open

    class Counting:  # safe_open, counting the slices read from each tensor
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_slice(self, name):
            view = self.inner.get_slice(name)

            class View:
                def __getattr__(self, attr):
                    return getattr(view, attr)

                def __getitem__(self, rows):
                    reads.append((name, rows.start, rows.stop))
                    return view[rows]
            return View()

    monkeypatch.setattr(store, "safe_open", Counting)
    loaded = Catalog.load(path)
    assert [r for r in reads if r[0] == "embeddings" and r[2] - r[1] > 1] == [
        ("embeddings", start, min(start + 4, 39)) for start in range(0, 39, 4)]
    assert loaded.embeddings.dtype == np.float32 and loaded.row_sku.dtype == np.int32
    np.testing.assert_array_equal(loaded.embeddings, catalog.embeddings)
    np.testing.assert_array_equal(loaded.row_sku, catalog.row_sku)
    assert loaded.version == catalog.version


def test_saved_file_is_readable_by_other_users(tmp_path):
    """safetensors alone writes 0600: a catalogue built as root must still load as UID 10001."""
    path = tmp_path / "c.safetensors"
    random_catalog(products=2, refs_per_product=1).save(path)
    assert path.stat().st_mode & 0o777 == 0o644


def test_version_is_a_content_hash():
    a = random_catalog(products=5, refs_per_product=1, seed=0)
    b = random_catalog(products=5, refs_per_product=1, seed=0)
    c = random_catalog(products=5, refs_per_product=1, seed=1)
    assert a.version == b.version  # created_at differs, content does not
    assert a.version != c.version


def test_file_holds_no_pickle(tmp_path):
    path = tmp_path / "c.safetensors"
    random_catalog(products=3, refs_per_product=1).save(path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert set(header) == {"__metadata__", "embeddings", "row_sku"}
    assert json.loads(header["__metadata__"]["shelfmatch"])["format"] == "shelfmatch-catalog/1"


def test_tampered_vectors_are_detected(tmp_path):
    catalog = random_catalog(products=3, refs_per_product=1)
    path = tmp_path / "c.safetensors"
    catalog.save(path)
    meta = {"shelfmatch": json.dumps({**json.loads(_metadata(path)), "version": "000000000000"})}
    save_file({"embeddings": catalog.embeddings, "row_sku": catalog.row_sku}, str(path), metadata=meta)
    with pytest.raises(CatalogFileError, match="does not match its version"):
        Catalog.load(path)


def test_vectors_stored_in_another_dtype_are_refused(tmp_path):
    """The version is hashed over the float32 bytes as they are read: the same numbers stored as
    float64 are not this catalogue."""
    catalog = random_catalog(products=3, refs_per_product=1)
    path = tmp_path / "c.safetensors"
    catalog.save(path)
    meta = {"shelfmatch": _metadata(path)}
    save_file({"embeddings": catalog.embeddings.astype(np.float64), "row_sku": catalog.row_sku}, str(path),
              metadata=meta)
    with pytest.raises(CatalogFileError, match="embeddings is F64, expected F32"):
        Catalog.load(path)


def test_a_tensor_of_a_dtype_numpy_lacks_is_not_a_catalogue(tmp_path):
    """bf16 has no numpy dtype: safetensors raises TypeError, which must be "not a catalogue" (a
    running service keeps its catalogue then), not an error that escapes the watcher."""
    import torch
    from safetensors.torch import save_file as save_torch

    catalog = random_catalog(products=3, refs_per_product=1)
    path = tmp_path / "c.safetensors"
    catalog.save(path)
    save_torch({"embeddings": torch.from_numpy(catalog.embeddings), "row_sku": torch.from_numpy(catalog.row_sku),
                "head.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path),
               metadata={"shelfmatch": _metadata(path)})
    with pytest.raises(CatalogFileError, match="not a readable catalogue"):
        Catalog.load(path)


def test_other_files_are_refused(tmp_path):
    with pytest.raises(CatalogFileError, match="does not exist"):
        Catalog.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a catalogue at all")
    with pytest.raises(CatalogFileError, match="not a readable catalogue"):
        Catalog.load(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(plain))
    with pytest.raises(CatalogFileError, match="no shelfmatch metadata"):
        Catalog.load(plain)


def _metadata(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return f.metadata()["shelfmatch"]
