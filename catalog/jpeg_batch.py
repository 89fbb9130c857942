"""Batched JPEG decoding on the model's device: nvJPEG on a GPU, libjpeg-turbo on a CPU.

Only :class:`~catalog.preprocess.PlainJpeg` photos come here: their headers passed every check
of :func:`~catalog.preprocess.decode` and they need no colour conversion or rotation, so decoding
and resizing are all that is left. The resize is bilinear with antialiasing, like Pillow's, so
the model sees nearly the pixels the catalogue was built from (bench/gpu.py measures how near,
as cosine similarity between the two paths' embeddings).

A photo the hardware decoder refuses, or whose resize fails on the device (out of memory, a
scale factor the kernel cannot do), comes back as None; the caller decodes it with Pillow, which
either succeeds or gives the dead-letter reason. So no image can stop the service here.

Large frames are first averaged down by the factor Pillow's ``draft`` would use
(:func:`draft_factor`), so both paths see nearly the same pixels.

Streams: decoding and resizing run on the decoder's own CUDA stream, which is synchronised before
the call returns; so the stream is idle whenever a call starts (torchvision's nvJPEG must not
write into memory that another stream still reads), and the results are complete for any
stream. The caller keeps the tensors alive until the model that reads them has finished
(``Model.__call__`` synchronises the device), so the caching allocator never hands their memory
back to this stream while it is still being read.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.nn import functional as F

from catalog.preprocess import PlainJpeg, jpeg_bytes

# Full-resolution float pixels resized in one call; bounds the memory a batch of large frames takes.
RESIZE_CHUNK_PIXELS = 64_000_000


def draft_factor(width: int, height: int, size: tuple[int, int]) -> int:
    """The 1/k downscale Pillow's ``draft`` lets libjpeg do for :func:`~catalog.preprocess.decode`:
    the largest k in 8, 4, 2 that keeps both sides at least the larger side of ``size``.

    Averaging k x k blocks before the resize mimics it, so a large frame gets nearly the pixels
    the Pillow path gives (measured: half the difference of resizing from full size), for less work.
    """
    side = max(size)
    return next((k for k in (8, 4, 2) if -(-width // k) >= side and -(-height // k) >= side), 1)


class JpegBatchDecoder:
    """Decodes lists of plain JPEGs into uint8 (3, H, W) tensors at the model's input size."""

    def __init__(self, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg  # imported here: only this path needs it

        self.device = device
        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        # Its own stream, so decoding the next batch overlaps the model running this one.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, jpegs: list[PlainJpeg], size: tuple[int, int]) -> list[torch.Tensor | None]:
        """Decoded, resized images in input order (None where the decoder refused one).

        ``size`` is (width, height). The tensors are ready to use from any stream on return.
        """
        if not jpegs:
            return []
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream, torch.inference_mode():
            images = self._decode(jpegs)
            out = self._resize(images, jpegs, size)
            if self._stream is not None:
                self._stream.synchronize()
        return out

    def _decode(self, jpegs: list[PlainJpeg]) -> list[torch.Tensor | None]:
        # torchvision's notice of its decoders' move to TorchCodec is filtered in catalog.preprocess.
        data = [jpeg_bytes(j.data) for j in jpegs]
        try:
            return list(self._decode_jpeg(data, mode=self._rgb, device=self.device))
        except RuntimeError:
            pass  # one bad image fails the whole batch call: find it
        images: list[torch.Tensor | None] = []
        for d in data:
            try:
                images.append(self._decode_jpeg(d, mode=self._rgb, device=self.device))
            except RuntimeError:
                images.append(None)
        return images

    @staticmethod
    def _resize(
        images: list[torch.Tensor | None], jpegs: list[PlainJpeg], size: tuple[int, int],
    ) -> list[torch.Tensor | None]:
        width, height = size
        out: list[torch.Tensor | None] = [None] * len(images)
        same_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (img, jpeg) in enumerate(zip(images, jpegs, strict=True)):
            if img is not None and tuple(img.shape) == (3, jpeg.height, jpeg.width):
                same_shape[tuple(img.shape)].append(i)
        for shape, idx in same_shape.items():  # one resize per frame size (cameras repeat theirs)
            per_chunk = max(1, RESIZE_CHUNK_PIXELS // (shape[1] * shape[2]))
            k = draft_factor(shape[2], shape[1], size)
            for start in range(0, len(idx), per_chunk):
                chunk = idx[start : start + per_chunk]
                try:
                    batch = torch.stack([img for i in chunk if (img := images[i]) is not None]).float()  # all set
                    if k > 1:
                        batch = F.avg_pool2d(batch, k, ceil_mode=True)
                    if batch.shape[-2:] != (height, width):
                        batch = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True,
                                              align_corners=False)
                    resized = batch.round_().clamp_(0, 255).to(torch.uint8)
                except RuntimeError:  # incl. torch.OutOfMemoryError: these go to Pillow
                    continue
                for i, img in zip(chunk, resized, strict=True):
                    out[i] = img
        return out
