"""Real photos from the demo data, and generated variants: valid oddities and poison inputs."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "grocery-demo"
REFERENCES = DEMO / "references"
PHOTOS = DEMO / "photos"


def store_photos() -> list[tuple[Path, str]]:
    """Every demo store photo with its true SKU (the folder name)."""
    return [(p, p.parent.name) for p in sorted(PHOTOS.glob("*/*.jpg"))]


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


# Valid oddities: each must decode and be matched ------------------------------------------

def grayscale(img: Image.Image) -> bytes:
    return encode(img.convert("L"), "PNG")


def cmyk_jpeg(img: Image.Image) -> bytes:
    return encode(img.convert("CMYK"), "JPEG", quality=95)


def gray16_png(img: Image.Image) -> bytes:
    arr = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return encode(Image.fromarray(arr), "PNG")


def rgba_png(img: Image.Image, alpha: int = 255) -> bytes:
    rgba = img.convert("RGBA")
    rgba.putalpha(alpha)
    return encode(rgba, "PNG")


def palette_png(img: Image.Image) -> bytes:
    return encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG")


def exif_rotated_jpeg(img: Image.Image) -> bytes:
    """Pixels stored rotated 90° clockwise, with EXIF orientation 6 saying how to turn them upright.

    Orientation 6 means "rotate 90° clockwise to display", so the stored pixels are the upright
    picture rotated 90° counter-clockwise.
    """
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def one_pixel() -> bytes:
    return encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")


def webp(img: Image.Image) -> bytes:
    return encode(img, "WEBP", quality=90)


# Poison: each must go to the dead-letter topic with its reason ------------------------------

def random_bytes(n: int = 4096, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def truncated_jpeg(img: Image.Image) -> bytes:
    data = encode(img, "JPEG", quality=90)
    return data[: len(data) // 3]


def corrupt_body_jpeg(img: Image.Image) -> bytes:
    """A valid JPEG header followed by garbage where the entropy-coded data should be."""
    data = bytearray(encode(img, "JPEG", quality=90))
    sos = data.find(b"\xff\xda")
    start = sos + 20
    data[start:] = random_bytes(len(data) - start, seed=3).replace(b"\xff", b"\x00")
    data[-2:] = b"\xff\xd9"
    # Break the Huffman table reference too, so the decoder cannot silently produce grey.
    dht = data.find(b"\xff\xc4")
    data[dht + 4 : dht + 21] = b"\xff" * 17
    return bytes(data)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    row = b"\x00" + b"\x00" * width
    idat = zlib.compress(row * 8, 9)  # a few rows of zeros: the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiff(img: Image.Image) -> bytes:
    return encode(img, "TIFF")


def gif(img: Image.Image) -> bytes:
    return encode(img, "GIF")


def eps_header() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def svg() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def oversized(limit: int) -> bytes:
    """A JPEG-looking value one byte over ``limit``."""
    return b"\xff\xd8\xff\xe0" + os.urandom(limit - 3)
