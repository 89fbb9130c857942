"""Images -> L2-normalised vectors on the chosen device.

Batches travel to the device as uint8 (a quarter of the bytes of float32); scaling to [0, 1],
mean/std normalisation, the backbone and the L2 normalisation all run there in one module.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from catalog.models import Fingerprint, LoadedBackbone


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


class _Normalised(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module | None, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std)
        x = (pixels.float() - self.mean) / self.std
        features = F.normalize(self.backbone(x).float(), dim=1)
        if self.head is not None:
            features = F.normalize(self.head(features), dim=1)
        return features


class Embedder:
    """Embeds uint8 image batches (N, 3, H, W) into unit vectors (N, dim)."""

    def __init__(self, backbone: LoadedBackbone, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.fingerprint: Fingerprint = backbone.fingerprint
        pre = self.fingerprint.preprocessing
        self._net = _Normalised(backbone.network, backbone.head, pre.mean, pre.std).to(self.device).eval()
        self._non_blocking = self.device.type == "cuda"

    @property
    def input_size(self) -> tuple[int, int]:
        return self.fingerprint.preprocessing.size

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit vectors for a uint8 batch; the result stays on the embedder's device."""
        if pixels.device != self.device:
            if self._non_blocking:
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=self._non_blocking)
        return self._net(pixels)
