"""Incremental catalogue changes: add references (only the new images are embedded), remove SKUs
or references. Each returns a new :class:`~catalog.store.Catalog`, hence a new content-hash version.

The model is the catalogue's own (its backbone, weights and projection head, rebuilt from the
fingerprint), so new rows live in the same vector space as the old ones; a model that does not
reproduce the fingerprint is refused. The head and the calibration are kept: the model did not
change, but the products did, so the calibrated threshold may no longer give the precision it was
chosen for (a warning says so).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from catalog.build import Reference, embed_images
from catalog.embedder import Embedder
from catalog.errors import CatalogError, FingerprintMismatchError
from catalog.models import backbone_of
from catalog.store import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """What an add or a remove did, for the command's report."""

    catalog: Catalog
    rows_added: int = 0
    rows_removed: int = 0
    skus_added: tuple[str, ...] = ()
    skus_removed: tuple[str, ...] = ()
    skipped: int = 0  # references given that the catalogue already had


def _with_rows(base: Catalog, embeddings: np.ndarray, row_skus: list[str], references: list[str]) -> Catalog:
    """``base`` with other rows: the SKU list is rebuilt (sorted) from the rows' SKUs."""
    skus = tuple(sorted(set(row_skus)))
    index = {s: i for i, s in enumerate(skus)}
    return replace(
        base, embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        row_sku=np.array([index[s] for s in row_skus], dtype=np.int32), skus=skus, references=tuple(references),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _row_skus(catalog: Catalog) -> list[str]:
    return [catalog.skus[i] for i in catalog.row_sku]


def _references(catalog: Catalog) -> list[str]:
    # Catalogues written before references were recorded have none: give each row a placeholder.
    if len(catalog.references) == len(catalog.row_sku):
        return list(catalog.references)
    return [f"<row {i}>" for i in range(len(catalog.row_sku))]


def _warn_calibration(catalog: Catalog) -> None:
    if catalog.calibration is not None:
        log.warning(
            "calibration kept (threshold %.3f, min margin %.3f) but the products changed: run "
            "`shelfmatch catalog calibrate` again to refresh it", catalog.calibration.threshold,
            catalog.calibration.min_margin,
        )


def model_of(catalog: Catalog, device: str = "auto", weights: str | None = None) -> Embedder:
    """The catalogue's own model (backbone, weights, head), checked against its fingerprint."""
    source = weights or catalog.weights_source
    backbone = backbone_of(catalog.fingerprint, source, catalog.head())
    if backbone.fingerprint != catalog.fingerprint:
        raise FingerprintMismatchError(
            f"the catalogue was built with {catalog.fingerprint.describe()} but weights {source!r} give "
            f"{backbone.fingerprint.describe()}; give --weights with the weights it was built with"
        )
    return Embedder(backbone, device)


def add_references(
    catalog: Catalog, refs: list[Reference], *, embedder: Embedder, batch_size: int = 32, progress: bool = True,
) -> Change:
    """Append ``refs`` (new SKUs or more images of existing ones); references whose path the
    catalogue already holds are skipped, and only the others are embedded."""
    if embedder.fingerprint != catalog.fingerprint:
        raise FingerprintMismatchError(
            f"model {embedder.fingerprint.describe()} is not the catalogue's {catalog.fingerprint.describe()}"
        )
    known = {os.path.abspath(p) for p in catalog.references}  # as loaded: absolute (see catalog.store)
    new = [r for r in refs if os.path.abspath(r.path) not in known]
    if not new:
        return Change(catalog=catalog, skipped=len(refs))
    vectors = embed_images([r.path for r in new], embedder, batch_size=batch_size, progress=progress,
                           desc="embedding new references")
    updated = _with_rows(
        catalog, np.concatenate([catalog.embeddings, vectors]), _row_skus(catalog) + [r.sku for r in new],
        _references(catalog) + [os.path.abspath(r.path) for r in new],
    )
    _warn_calibration(updated)
    return Change(catalog=updated, rows_added=len(new), skipped=len(refs) - len(new),
                  skus_added=tuple(sorted({r.sku for r in new} - set(catalog.skus))))


def remove(catalog: Catalog, *, skus: Sequence[str] = (), references: Sequence[str | Path] = ()) -> Change:
    """Drop every row of ``skus`` and the rows of ``references`` (paths as the catalogue records
    them, see ``shelfmatch catalog info``). Naming something the catalogue lacks is an error, and so
    is removing every row: a catalogue must keep at least one product."""
    missing_skus = sorted(set(skus) - set(catalog.skus))
    if missing_skus:
        raise CatalogError(f"{len(missing_skus)} SKUs are not in the catalogue: {', '.join(missing_skus[:5])}")
    paths = [os.path.abspath(p) for p in _references(catalog)]  # compared as absolute paths
    wanted = {os.path.abspath(p) for p in references}
    missing_refs = sorted(wanted - set(paths))
    if missing_refs:
        raise CatalogError(f"{len(missing_refs)} references are not in the catalogue, e.g. {missing_refs[0]}")
    row_skus = _row_skus(catalog)
    dropped = set(skus)
    keep = np.array([s not in dropped and p not in wanted for s, p in zip(row_skus, paths, strict=True)], dtype=bool)
    if not keep.any():
        raise CatalogError("that would remove every reference; a catalogue needs at least one product")
    kept = np.flatnonzero(keep)
    updated = _with_rows(catalog, catalog.embeddings[kept], [row_skus[i] for i in kept], [paths[i] for i in kept])
    _warn_calibration(updated)
    return Change(catalog=updated, rows_removed=int((~keep).sum()),
                  skus_removed=tuple(sorted(set(catalog.skus) - set(updated.skus))))
