"""Decoding on one CPU core: the service's decode against Pillow's decode and resize (the path it
replaced), on the demo store photos and on generated shelf frames, in one run.

    .venv/bin/python bench/decode.py [--repeat 5]

- ``Pillow``: ``Image.open``, ``draft``, ``load``, ``convert("RGB")``, ``resize(BILINEAR)``, then the
  uint8 tensor (what ``catalog.preprocess.decode`` did before 2026-12-02);
- ``service``: ``decode()`` for a photo, ``decode_frame()`` for a frame (torchvision's libjpeg-turbo
  for a plain JPEG that needs no draft, torch's uint8 resize).

Prints ms per image (the best of ``--repeat`` passes over all images) and the ratio.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import shelf_frames, store_photos  # noqa: E402
from catalog.preprocess import decode, decode_frame, to_tensor  # noqa: E402


def pillow(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (max(size), max(size)))
        return to_tensor(img.convert("RGB").resize(size, Image.Resampling.BILINEAR))


def best_ms(fn: Callable[[bytes], object], images: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for data in images:
            fn(data)
        best = min(best, (time.perf_counter() - start) / len(images))
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a decode thread: one core
    photos = store_photos()
    frames = shelf_frames(8)  # 1920x1080
    with Image.open(io.BytesIO(frames[0])) as img:
        small = img.resize((1600, 800))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=90)
    cases = [
        ("store photo 348 px -> 224x224", photos, (224, 224), lambda d: decode(d, (224, 224))),
        ("frame 1600x800 (no resize)", [buf.getvalue()], (1600, 800), lambda d: decode_frame(d, 1600)),
        ("frame 1920x1080 -> 1600x900", frames, (1600, 900), lambda d: decode_frame(d, 1600)),
    ]
    print(f"{'images':<34}{'Pillow ms':>12}{'service ms':>12}{'ratio':>8}")
    for name, images, size, service in cases:
        old = best_ms(lambda d, size=size: pillow(d, size), images, args.repeat)
        new = best_ms(service, images, args.repeat)
        print(f"{name:<34}{old:>12.2f}{new:>12.2f}{old / new:>7.2f}x")


if __name__ == "__main__":
    main()
