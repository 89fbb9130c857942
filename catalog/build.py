"""Reference images (a folder per SKU, or a CSV manifest) -> a catalogue file."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from catalog.augment import Augmentation
from catalog.embedder import Embedder
from catalog.errors import CatalogError, ImageRejected
from catalog.models import LoadedBackbone, load_backbone
from catalog.preprocess import DecodeLimits, decode
from catalog.store import Catalog

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# References are trusted files, possibly large packshots in any common format.
REFERENCE_LIMITS = DecodeLimits(max_bytes=64 * 1024 * 1024, formats=("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"))


@dataclass(frozen=True)
class Reference:
    path: Path
    sku: str


def references_from_folder(images: Path) -> list[Reference]:
    """``images/<sku>/<file>``: every image file in a SKU's folder is one reference."""
    if not images.is_dir():
        raise CatalogError(f"{images} is not a folder")
    refs = [
        Reference(path=p, sku=sku_dir.name)
        for sku_dir in sorted(d for d in images.iterdir() if d.is_dir())
        for p in sorted(sku_dir.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not refs:
        raise CatalogError(f"no images found under {images}/<sku>/")
    return refs


def references_from_manifest(manifest: Path, images: Path | None) -> list[Reference]:
    """A CSV with columns ``path,sku``; relative paths are taken from ``images`` (or the CSV's folder)."""
    base = images or manifest.parent
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "sku"} <= set(reader.fieldnames):
            raise CatalogError(f"{manifest} needs a header with columns path,sku")
        refs = [Reference(path=base / row["path"], sku=row["sku"].strip()) for row in reader]
    missing = [r.path for r in refs if not r.path.is_file()]
    if missing:
        raise CatalogError(f"{len(missing)} files in {manifest} do not exist, e.g. {missing[0]}")
    if not refs:
        raise CatalogError(f"{manifest} lists no images")
    return refs


def embed_images(
    paths: list[Path], embedder: Embedder, *, batch_size: int = 32, workers: int = 4, progress: bool = True,
    desc: str = "embedding", cache: Path | None = None, augmentation: Augmentation | None = None,
) -> np.ndarray:
    """Unit vectors (N, dim) for image files, decoded in a thread pool and embedded in batches.

    With ``augmentation``, row i is a random view of file i (see :mod:`catalog.augment`) instead of
    the file as it is.

    With ``cache`` (a folder), the result is stored under a key made of the model fingerprint,
    the augmentation (if any) and every file's path, size and modification time, and reused
    while none of them changes.
    """
    if cache is not None:
        key = hashlib.sha256(json.dumps(embedder.fingerprint.to_dict(), sort_keys=True).encode())
        if augmentation is not None:
            key.update(augmentation.identity().encode())
        for p in paths:
            st = p.stat()
            key.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        cached = cache / f"{key.hexdigest()[:24]}.npy"
        if cached.exists():
            return np.load(cached)
        vectors = embed_images(paths, embedder, batch_size=batch_size, workers=workers, progress=progress, desc=desc,
                               augmentation=augmentation)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cached, vectors)
        return vectors
    size = embedder.input_size

    def load(item: tuple[int, Path]) -> torch.Tensor:
        index, path = item
        try:
            if augmentation is None:
                return decode(path.read_bytes(), size, REFERENCE_LIMITS).pixels
            big = decode(path.read_bytes(), augmentation.decode_size(size), REFERENCE_LIMITS).pixels
            return augmentation.view(big, size, index)
        except ImageRejected as exc:
            raise CatalogError(f"image {path} ({exc.reason}): {exc}") from exc

    chunk_vectors: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), unit="img", desc=desc, disable=not progress
    ) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            pixels = torch.stack(list(pool.map(load, enumerate(chunk, start))))
            chunk_vectors.append(embedder.embed(pixels).cpu().numpy())
            bar.update(len(chunk))
    return (
        np.concatenate(chunk_vectors).astype(np.float32) if chunk_vectors
        else np.zeros((0, embedder.fingerprint.dim), np.float32)
    )


def catalog_from_vectors(refs: list[Reference], vectors: np.ndarray, backbone: LoadedBackbone, weights: str) -> Catalog:
    skus = tuple(sorted({r.sku for r in refs}))
    sku_index = {s: i for i, s in enumerate(skus)}
    return Catalog(
        embeddings=vectors,
        row_sku=np.array([sku_index[r.sku] for r in refs], dtype=np.int32),
        skus=skus,
        fingerprint=backbone.fingerprint,
        weights_source=weights,
        references=tuple(str(r.path) for r in refs),
        head_state=None
        if backbone.head is None
        else {k: v.detach().cpu().numpy() for k, v in backbone.head.state_dict().items()},
    )


def build_catalog(
    refs: list[Reference],
    *,
    model: str,
    weights: str = "imagenet",
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 4,
    progress: bool = True,
    cache: Path | None = None,
    input_size: int | None = None,
    scales: tuple[int, ...] = (),
) -> Catalog:
    """Embed every reference image and assemble the catalogue (rows in input order).

    ``input_size`` overrides the backbone's own resolution; ``scales`` runs it at several and joins
    the features (see :func:`catalog.models.load_backbone`).
    """
    backbone = load_backbone(model, weights=weights, input_size=input_size, scales=scales)
    vectors = embed_images(
        [r.path for r in refs],
        Embedder(backbone, device),
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        desc=f"embedding with {model}",
        cache=cache,
    )
    return catalog_from_vectors(refs, vectors, backbone, weights)
