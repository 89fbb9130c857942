"""The catalogue file: reference vectors, the SKU of each row, the model fingerprint, a version.

Format: one safetensors file (no pickle, memory-mappable) holding
``embeddings`` (float32, rows x dim, unit length) and ``row_sku`` (int32 index into the SKU list),
with a JSON document under the metadata key ``shelfmatch``::

    {"format": "shelfmatch-catalog/1", "version": "<12 hex>", "created_at": "<RFC 3339>",  # /2: joined sizes
     "fingerprint": {...}, "weights_source": "imagenet", "skus": [...], "references": [...],
     "references_base": "catalog", "calibration": {"threshold": 0.9, "min_margin": 0.02} | null,
     "compliance": {"min_lead": -0.05, "min_score": 0.5, "empty_margin": 0.0, "unknown_below": 0.3} | null}

and, when a projection head was trained (``shelfmatch catalog train-head``), its weights as
``head.*`` tensors; the fingerprint then names the head's content hash.

``references`` are relative to the folder of the catalogue file (``references_base``); files
written before that field hold them as given to the build, relative to its working directory.

``version`` is a hash of the vectors, the SKUs and the fingerprint: two builds of the same
references with the same model get the same version, and any change gives a new one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from catalog.errors import CatalogFileError
from catalog.models import Fingerprint, ProjectionHead

FORMAT = "shelfmatch-catalog/1"
# A catalogue at joined input sizes (Fingerprint.scales): readers of /1 would drop the sizes and,
# with a head, take it for a one-size catalogue, so it carries a format they refuse.
JOINED_FORMAT = "shelfmatch-catalog/2"


@dataclass(frozen=True)
class Calibration:
    """Operating point chosen on labelled photos; the consumer uses it unless told otherwise."""

    threshold: float
    min_margin: float


@dataclass(frozen=True)
class ComplianceCalibration:
    """Operating point of planogram verification (see :mod:`catalog.compliance` for the rule);
    chosen by ``shelfmatch catalog calibrate-compliance`` on labelled shelf frames."""

    min_lead: float  # the expected product must lead the best other product by this (may be < 0)
    min_score: float  # and score at least this, else the facing is not ``ok``
    empty_margin: float = 0.0  # the reserved empty entry must beat the best product by this
    unknown_below: float = -1.0  # best product score below this: ``unknown`` rather than ``wrong-product``


@dataclass(frozen=True)
class Catalog:
    embeddings: np.ndarray  # float32 (rows, dim), unit rows
    row_sku: np.ndarray  # int32 (rows,), index into skus
    skus: tuple[str, ...]
    fingerprint: Fingerprint
    weights_source: str = "imagenet"
    references: tuple[str, ...] = ()
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    calibration: Calibration | None = None
    head_state: dict[str, np.ndarray] | None = None  # projection head weights, when trained
    compliance: ComplianceCalibration | None = None  # planogram verification's operating point

    def __post_init__(self) -> None:
        rows, dim = self.embeddings.shape
        if dim != self.fingerprint.dim:
            raise CatalogFileError(f"vectors have {dim} values, the model gives {self.fingerprint.dim}")
        if self.row_sku.shape != (rows,):
            raise CatalogFileError("row_sku must have one entry per vector")
        if rows and (self.row_sku.min() < 0 or self.row_sku.max() >= len(self.skus)):
            raise CatalogFileError("row_sku points outside the SKU list")

    @functools.cached_property  # the catalogue is frozen: hashed once (0.2 s per 256 MB on a CPU core)
    def version(self) -> str:
        h = hashlib.sha256()
        # .data: the same bytes as tobytes(), hashed where they lie instead of copied first
        vectors = np.ascontiguousarray(self.embeddings, dtype="<f4")
        h.update(vectors.data.cast("B") if vectors.size else b"")
        return _version(h, self.row_sku, self.skus, self.fingerprint)

    def head(self) -> ProjectionHead | None:
        if self.head_state is None:
            return None
        return ProjectionHead.from_state({k: torch.from_numpy(v) for k, v in self.head_state.items()})

    def save(self, path: str | Path) -> None:
        """Write atomically: readers never see a half-written catalogue."""
        path = Path(path)
        meta = {
            "format": JOINED_FORMAT if self.fingerprint.scales else FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "fingerprint": self.fingerprint.to_dict(),
            "weights_source": self.weights_source,
            "skus": list(self.skus),
            # Relative to the catalogue file's folder, so that both can move together and the file
            # works from any working directory (files written before this field: relative to the
            # working directory of the build).
            "references": [_relative_to(ref, path.parent) for ref in self.references],
            "references_base": "catalog",
            "calibration": None if self.calibration is None else vars(self.calibration),
            "compliance": None if self.compliance is None else vars(self.compliance),
        }
        tensors = {
            "embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32),
            "row_sku": np.ascontiguousarray(self.row_sku, dtype=np.int32),
            **{f"head.{k}": np.ascontiguousarray(v) for k, v in (self.head_state or {}).items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"shelfmatch": json.dumps(meta)})
        # safetensors creates files 0600: a catalogue built as root would be unreadable by the
        # service's own user (UID 10001 in the image). A catalogue is not a secret.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        if not path.is_file():
            raise CatalogFileError(f"catalogue file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise CatalogFileError(f"catalogue file {path} is not readable by this user (uid {os.getuid()}): "
                                   f"check its mode and owner")
        vectors = hashlib.sha256()  # the version's hash of the vectors, fed as they are read
        try:
            raw, tensors = _read(path, hash_embeddings=vectors)
        # TypeError: a dtype numpy lacks (bf16 head weights, say)
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise CatalogFileError(f"{path} is not a readable catalogue: {exc}") from exc
        if raw is None:
            raise CatalogFileError(f"{path} has no shelfmatch metadata")
        # A file cut short or edited by hand can fail anywhere below: it is still only "not a
        # catalogue", never another kind of error (a running service keeps its catalogue then).
        try:
            meta = json.loads(raw)
            if meta.get("format") not in (FORMAT, JOINED_FORMAT):
                raise CatalogFileError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r} "
                                       f"or {JOINED_FORMAT!r}")
            calibration = meta.get("calibration")
            compliance = meta.get("compliance")
            head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
            catalog = cls(
                embeddings=tensors["embeddings"],
                row_sku=tensors["row_sku"],
                skus=tuple(meta["skus"]),
                fingerprint=Fingerprint.from_dict(meta["fingerprint"]),
                weights_source=meta.get("weights_source", "imagenet"),
                references=tuple(
                    _resolved(ref, path.parent) if meta.get("references_base") == "catalog" else ref
                    for ref in meta.get("references", ())
                ),
                created_at=meta["created_at"],
                calibration=None if calibration is None else Calibration(**calibration),
                head_state=head or None,
                compliance=None if compliance is None else ComplianceCalibration(**compliance),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CatalogFileError(f"{path} is not a readable catalogue: {type(exc).__name__}: {exc}") from exc
        version = _version(vectors, catalog.row_sku, catalog.skus, catalog.fingerprint)
        if version != meta.get("version"):
            raise CatalogFileError(f"{path}: content does not match its version {meta.get('version')} (corrupt?)")
        catalog.__dict__["version"] = version  # what the cached property would compute, already known
        return catalog

    def summary(self) -> str:
        counts = np.bincount(self.row_sku, minlength=len(self.skus))
        cal = self.calibration
        lines = [
            f"version      {self.version}",
            f"created at   {self.created_at}",
            f"model        {self.fingerprint.backbone} (weights {self.fingerprint.weights}, "
            f"source {self.weights_source})",
            f"head         {self.fingerprint.head or 'none (frozen backbone features)'}",
            f"vectors      {len(self.row_sku)} x {self.fingerprint.dim} float32",
            f"products     {len(self.skus)} ({counts.min() if len(counts) else 0}-"
            f"{counts.max() if len(counts) else 0} references each)",
            f"input        {self.fingerprint.preprocessing.size[0]}x{self.fingerprint.preprocessing.size[1]} "
            f"{self.fingerprint.preprocessing.resample}, mean {self.fingerprint.preprocessing.mean}, "
            f"std {self.fingerprint.preprocessing.std}"
            + (f", joined sizes {'+'.join(map(str, self.fingerprint.scales))}" if self.fingerprint.scales else ""),
            "calibration  "
            + ("none" if cal is None else f"threshold {cal.threshold:.3f}, min margin {cal.min_margin:.3f}"),
        ]
        if self.compliance is not None:
            c = self.compliance
            lines.append(f"compliance   min lead {c.min_lead:.3f}, min score {c.min_score:.3f}, "
                         f"empty margin {c.empty_margin:.3f}, unknown below {c.unknown_below:.3f}")
        return "\n".join(lines)


# The most that one read from the file copies at once. safetensors holds the GIL while it copies a
# tensor: the whole 256 MB matrix of 50,000 references in one call held it ~120 ms, during which the
# event loop and the model thread of a running service stood still (the p99 of a catalogue swap).
# In slices of 1 MB the longest hold measured was under 4 ms (bench/catalog_swap.py has the effect).
READ_SLICE_BYTES = 1 << 20


def _version(vectors: hashlib._Hash, row_sku: np.ndarray, skus: tuple[str, ...], fingerprint: Fingerprint) -> str:
    """The catalogue's version: ``vectors`` has hashed its embeddings (float32, little-endian, row
    by row); the SKU of each row, the SKU list and the fingerprint follow."""
    vectors.update(np.ascontiguousarray(row_sku, dtype="<i4").tobytes())
    vectors.update(json.dumps([skus, fingerprint.to_dict()], sort_keys=True).encode())
    return vectors.hexdigest()[:12]


# (safetensors) dtypes as stored: embeddings are hashed as read, so they must already be the
# version's little-endian float32
EXPECTED_DTYPES = {"embeddings": "F32", "row_sku": "I32"}


def _read(path: Path, *, hash_embeddings: hashlib._Hash) -> tuple[str | None, dict[str, np.ndarray]]:
    """The file's shelfmatch metadata and its tensors, each read in row slices of at most
    READ_SLICE_BYTES (see there why); the embeddings' bytes go through ``hash_embeddings`` slice by
    slice, while they are still in the CPU's cache (one pass over a large matrix, not two)."""
    with safe_open(str(path), framework="np") as f:
        raw = (f.metadata() or {}).get("shelfmatch")
        tensors = {}
        for name in f.keys():
            view = f.get_slice(name)
            stored, expected = view.get_dtype(), EXPECTED_DTYPES.get(name)
            if expected is not None and stored != expected:  # checked before a byte is read
                raise ValueError(f"{name} is {stored}, expected {expected}")
            tensors[name] = _read_tensor(f, name, view, hash_embeddings if name == "embeddings" else None)
        return raw, tensors


def _read_tensor(f: safe_open, name: str, view: Any, hasher: hashlib._Hash | None) -> np.ndarray:
    shape = view.get_shape()
    if len(shape) == 0 or shape[0] == 0:
        out = f.get_tensor(name)
        if hasher is not None:
            hasher.update(out.tobytes())
        return out
    first = view[0:1]
    rows = max(1, READ_SLICE_BYTES // max(1, first.nbytes))
    out = np.empty(tuple(shape), dtype=first.dtype)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        out[start:stop] = view[start:stop]
        if hasher is not None:
            hasher.update(out[start:stop].data.cast("B"))  # releases the GIL while it hashes
    return out


def _relative_to(reference: str, folder: Path) -> str:
    """``reference`` (absolute, or relative to the working directory) relative to ``folder``."""
    return os.path.relpath(os.path.abspath(reference), os.path.abspath(folder))


def _resolved(reference: str, folder: Path) -> str:
    """A stored reference path, relative to the catalogue's ``folder``, as an absolute path."""
    return os.path.normpath(os.path.join(os.path.abspath(folder), reference))
