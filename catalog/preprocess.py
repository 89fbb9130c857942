"""Encoded image bytes -> upright RGB pixels at the model's input size.

The same function decodes reference images when a catalogue is built and shelf photos in the
consumer, so both sides of the cosine similarity see identical pixels. (Catalogues built before
the resize moved from Pillow to torch, 2026-12-02, differ from today's photos by at most one grey
level on under 1% of their values; the fingerprint does not record the resize.)

Safety (Pillow's own guidance): the byte limit is checked before anything is parsed, the format
is checked twice (magic bytes, then ``Image.open(formats=...)``), the pixel count is checked from
the header before the pixels are decoded, and JPEGs are decoded with ``draft`` so a huge photo is
never materialised at full size.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn import functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from catalog.errors import ImageRejected


class RejectReason(StrEnum):
    """Stable codes for an image that cannot be matched (the dead-letter ``dlq-reason``)."""

    EMPTY = "empty"
    TOO_LARGE = "too-large"
    UNSUPPORTED_FORMAT = "unsupported-format"
    CORRUPT_IMAGE = "corrupt-image"
    DECOMPRESSION_BOMB = "decompression-bomb"
    BAD_HEADER = "bad-header"


# Leading bytes of each container Pillow can read that we may meet on a camera topic.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"WEBP", 8, "WEBP"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"%!PS", 0, "EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
)


def sniff_format(data: bytes) -> str | None:
    """Name of the image container ``data`` starts with, or None if unrecognised."""
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if name == "WEBP" and data[:4] != b"RIFF":
                continue
            return name
    return None


@dataclass(frozen=True)
class Decoded:
    pixels: torch.Tensor  # uint8 RGB (3, H, W) at the size asked for
    width: int  # of the original, upright
    height: int

    @property
    def image(self) -> Image.Image:
        """The pixels as a Pillow image (a copy), for code that draws or measures on one."""
        return Image.fromarray(self.pixels.permute(1, 2, 0).numpy(), "RGB")


@dataclass(frozen=True)
class DecodeLimits:
    """What an input image may be. Defaults suit shelf cameras up to 8K."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 64_000_000
    formats: tuple[str, ...] = field(default=("JPEG", "PNG", "WEBP"))


def _open(data: bytes, limits: DecodeLimits) -> tuple[Image.Image, str]:
    """Every check that needs no pixels: bytes, signature, declared format, header, pixel count."""
    if not data:
        raise ImageRejected(RejectReason.EMPTY.value, "message value is empty")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            RejectReason.TOO_LARGE.value,
            f"{len(data)} bytes is over the limit of {limits.max_bytes} bytes",
        )
    sniffed = sniff_format(data)
    if sniffed is None or sniffed not in limits.formats:
        what = sniffed or "unrecognised signature " + data[:8].hex()
        raise ImageRejected(
            RejectReason.UNSUPPORTED_FORMAT.value,
            f"{what} is not one of the allowed formats {', '.join(limits.formats)}",
        )
    try:
        img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB.value, str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(RejectReason.CORRUPT_IMAGE.value, f"{sniffed} header unreadable: {exc}") from exc
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            RejectReason.DECOMPRESSION_BOMB.value,
            f"{width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}",
        )
    return img, sniffed


def decode(data: bytes, size: tuple[int, int], limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Decode ``data`` into an upright RGB image resized to ``size`` (width, height).

    Raises :class:`ImageRejected` with a :class:`RejectReason` code for anything unusable.
    Valid oddities (grayscale, CMYK, palette, alpha, 16-bit, EXIF rotation) are converted.
    """
    return _decode_opened(*_open(data, limits), size, data)


def _decode_opened(
    img: Image.Image, sniffed: str, size: tuple[int, int], data: bytes, *, frame: bool = False,
) -> Decoded:
    width, height = img.size
    try:
        pixels = _libjpeg(img, data, size) if img.format == "JPEG" else None
        if pixels is None:
            if img.format == "JPEG":
                # Let libjpeg downscale by 1/2, 1/4 or 1/8 while staying at least `size` in both
                # dimensions (after a possible EXIF rotation, hence the larger side twice).
                side = max(size)
                img.draft("RGB", (side, side))
            img.load()
            loaded = img.size
            img = ImageOps.exif_transpose(img)
            if img.size != loaded:  # rotated by 90 degrees: report the upright size
                width, height = height, width
            pixels = to_tensor(to_rgb(img))
        if pixels.shape[1:] != (size[1], size[0]):
            # pixels are (3, H, W) over (H, W, 3) memory. Seen as a batch of one with its batch
            # stride at 3, torch resizes them into contiguous (3, h, w), which the model stage stacks
            # by plain copies (photos); seen with the whole image as batch stride, channels last, it
            # resizes large images faster and stays channels last, which the facing cut reads
            # fastest (frames).
            batch = pixels.permute(1, 2, 0)[None].permute(0, 3, 1, 2) if frame else pixels.unsqueeze(0)
            pixels = resized(batch, size)[0]
        return Decoded(pixels, width, height)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB.value, str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(RejectReason.CORRUPT_IMAGE.value, f"{sniffed} body undecodable: {exc}") from exc


def _libjpeg(img: Image.Image, data: bytes, size: tuple[int, int]) -> torch.Tensor | None:
    """A plain JPEG (:func:`probe_plain_jpeg`) that Pillow's ``draft`` would not shrink for
    ``size``, decoded by torchvision's libjpeg-turbo: the same decoder and settings as Pillow's,
    without Pillow's copies (bench/decode.py). None leaves it to Pillow: any other image, and one
    that torchvision refuses (Pillow then decodes it or gives the reason)."""
    side = max(size)
    if min(img.width // side, img.height // side) >= 2 or _plain_jpeg(img, data, size) is None:
        return None
    try:
        pixels = decode_jpeg(jpeg_bytes(data), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    return pixels if tuple(pixels.shape) == (3, img.height, img.width) else None


# torchvision >= 0.29 announces at every call that its image decoders move to TorchCodec; they
# still work, and catalog.preprocess and catalog.jpeg_batch are the places to change when they go.
# Filtered once here: warnings.catch_warnings() around each call is not thread-safe (decode threads
# would restore each other's filters, and could leave one in force for the whole process).
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")


def jpeg_bytes(data: bytes) -> torch.Tensor:
    """``data`` as the uint8 tensor torchvision's decoders take: a copy (a few microseconds against
    milliseconds of decoding), since a tensor over immutable bytes would be writable to torch."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_frame(data: bytes, max_side: int, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Decode ``data`` upright, keeping its aspect ratio, with its longer side at most ``max_side``
    (a shelf frame whose facings are cropped afterwards). Same checks and reasons as :func:`decode`;
    ``width`` and ``height`` are the original's, the image may be smaller."""
    img, sniffed = _open(data, limits)
    width, height = img.size
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
        width, height = height, width
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return _decode_opened(img, sniffed, size, data, frame=True)


@dataclass(frozen=True)
class PlainJpeg:
    """A JPEG that passed every header check and needs nothing but decoding and resizing, so
    it can go to a batched hardware decoder (nvJPEG) instead of Pillow."""

    data: bytes
    width: int
    height: int


# What the batched device decoder takes: it decodes at full size (no draft), so very large
# frames are cheaper through Pillow's draft, and an antialiased resize has a largest shrink factor.
DEVICE_MAX_PIXELS = 16_000_000
DEVICE_MAX_SHRINK = 64


def probe_plain_jpeg(
    data: bytes, limits: DecodeLimits = DecodeLimits(), size: tuple[int, int] = (224, 224),
) -> PlainJpeg | None:
    """The header checks of :func:`decode` without decoding pixels.

    Returns a :class:`PlainJpeg` for a baseline RGB or grayscale JPEG that is upright (no EXIF
    rotation), ends with its end-of-image marker, has at most ``DEVICE_MAX_PIXELS`` pixels and
    shrinks to ``size`` by at most ``DEVICE_MAX_SHRINK`` along each side; None for any other
    valid image (which :func:`decode` handles). Raises :class:`ImageRejected` exactly as
    :func:`decode` does for anything its header checks refuse.
    """
    return _plain_jpeg(_open(data, limits)[0], data, size)


def decode_unless_plain_jpeg(
    data: bytes, size: tuple[int, int], limits: DecodeLimits = DecodeLimits(),
) -> Decoded | PlainJpeg:
    """:func:`probe_plain_jpeg`, then :func:`decode` for anything not plain, parsing the header once."""
    img, sniffed = _open(data, limits)
    plain = _plain_jpeg(img, data, size)
    return plain if plain is not None else _decode_opened(img, sniffed, size, data)


def _plain_jpeg(img: Image.Image, data: bytes, size: tuple[int, int]) -> PlainJpeg | None:
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    if img.width * img.height > DEVICE_MAX_PIXELS:
        return None
    if img.width > DEVICE_MAX_SHRINK * size[0] or img.height > DEVICE_MAX_SHRINK * size[1]:
        return None
    if img.info.get("progressive") or img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return None
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):  # truncated: let Pillow judge it
        return None
    return PlainJpeg(data, img.width, img.height)


_EXIF_ORIENTATION = 0x0112


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grayscale: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor (3, H, W). Scaling and normalisation happen on the device."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def resized(pixels: torch.Tensor, size: tuple[int, int], *, in_float: bool | None = None) -> torch.Tensor:
    """A uint8 batch (N, 3, H, W) at ``size`` = (width, height), antialiased bilinear: Pillow's
    filter, within one grey level. The one resize of photos, frames, facings and joined input
    sizes. On a CPU it runs on uint8 channels-last, torch's vectorised path, faster than Pillow's
    (bench/decode.py); elsewhere (or with ``in_float``) in float, rounded back to uint8, within
    one grey level of the uint8 result."""
    width, height = size
    # Enlarging along both sides, the antialiased filter is plain bilinear (the same pixels,
    # tested), which torch computes in a third less time.
    antialias = width < pixels.shape[-1] or height < pixels.shape[-2]
    if not (pixels.device.type != "cpu" if in_float is None else in_float):
        return F.interpolate(pixels.contiguous(memory_format=torch.channels_last), size=(height, width),
                             mode="bilinear", antialias=antialias, align_corners=False)
    out = F.interpolate(pixels.float(), size=(height, width), mode="bilinear", antialias=antialias,
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
