"""Random views of a reference photo, for training the projection head only.

A shelf photo differs from the references of its product by framing, distance, mirror-image
placement and light. The head learns to ignore those differences better when it sees them during
training: each reference photo is decoded at a margin above the model's input size, then cut and
coloured at random (random-resized crop, horizontal flip, brightness/contrast/saturation/hue
jitter, all with :mod:`torchvision.transforms.v2.functional`).

Views never enter a catalogue and are never made at serving time: they only shape the head.
One :class:`Augmentation` gives one view per photo, drawn from a NumPy generator seeded by
(seed, photo index): the same references give the same views in any thread and on any run, so
the feature cache holds, and N views are the augmentations with seeds 0 to N-1, each cached on
its own (asking for 8 views after 4 embeds only the 4 new ones).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Augmentation:
    """How to draw one random view of each reference photo; ``seed`` tells views apart."""

    seed: int = 0
    scale: tuple[float, float] = (0.35, 1.0)  # share of the photo's area a crop keeps
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio
    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.25  # factors drawn in [1 - x, 1 + x]
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.03  # shift in [-x, x] of a full turn
    margin: float = 1.5  # decode at this multiple of the input size, so a crop keeps its detail

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must satisfy 0 < low <= high <= 1")

    def identity(self) -> str:
        """Every parameter, as stable text: part of the feature cache key."""
        return json.dumps(asdict(self), sort_keys=True)

    def decode_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return (round(size[0] * self.margin), round(size[1] * self.margin))

    def view(self, pixels: torch.Tensor, size: tuple[int, int], index: int) -> torch.Tensor:
        """A uint8 image (3, H, W) at ``size`` (width, height) from one uint8 (3, h, w) image decoded at
        :meth:`decode_size`; ``index`` (the photo's position among the references) seeds the draw."""
        rng = np.random.default_rng([self.seed, index])
        _, h, w = pixels.shape
        top, left, ch, cw = self._crop_box(h, w, rng)
        view = TF.resized_crop(pixels, top, left, ch, cw, [size[1], size[0]], antialias=True)
        if rng.random() < self.flip:
            view = TF.horizontal_flip(view)
        # Colour changes in a random order, as torchvision's ColorJitter does.
        for op in rng.permutation(4):
            if op == 0 and self.brightness:
                view = TF.adjust_brightness(view, rng.uniform(1 - self.brightness, 1 + self.brightness))
            elif op == 1 and self.contrast:
                view = TF.adjust_contrast(view, rng.uniform(1 - self.contrast, 1 + self.contrast))
            elif op == 2 and self.saturation:
                view = TF.adjust_saturation(view, rng.uniform(1 - self.saturation, 1 + self.saturation))
            elif op == 3 and self.hue:
                view = TF.adjust_hue(view, rng.uniform(-self.hue, self.hue))
        return view

    def _crop_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A box of random area share and aspect ratio (the random-resized-crop rule), inside the image."""
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = h * w * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        side = min(h, w)  # fall back to the central square
        return (h - side) // 2, (w - side) // 2, side, side
