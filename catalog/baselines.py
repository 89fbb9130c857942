"""The two non-CNN methods the research reviewed, as vectors comparable with one matrix product.

- ``histogram``: a joint RGB colour histogram (8 bins per channel), L2-normalised, so the
  similarity is the cosine between histograms.
- ``phash``: a 64-bit perceptual hash (``imagehash.phash``); bits are mapped to ±1/8 so that
  the dot product of two hashes is 1 - 2 * Hamming distance / 64, in [-1, 1] like a cosine.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from catalog.build import REFERENCE_LIMITS
from catalog.preprocess import decode

BASELINES = ("histogram", "phash")
_SIZE = (224, 224)


def _histogram(path: Path) -> np.ndarray:
    pixels = np.asarray(decode(path.read_bytes(), _SIZE, REFERENCE_LIMITS).image).reshape(-1, 3) // 32
    codes = pixels[:, 0].astype(np.int64) * 64 + pixels[:, 1] * 8 + pixels[:, 2]
    hist = np.bincount(codes, minlength=512).astype(np.float32)
    return hist / np.linalg.norm(hist)


def _phash(path: Path) -> np.ndarray:
    import imagehash

    image: Image.Image = decode(path.read_bytes(), _SIZE, REFERENCE_LIMITS).image
    bits = imagehash.phash(image).hash.flatten().astype(np.float32)
    return (bits * 2 - 1) / 8.0


def baseline_vectors(method: str, paths: list[Path], workers: int = 4) -> np.ndarray:
    fn = {"histogram": _histogram, "phash": _phash}[method]
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(fn, paths)))
