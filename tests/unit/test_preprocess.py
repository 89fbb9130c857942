import io

import numpy as np
import pytest
import torch
from PIL import Image

from catalog.errors import ImageRejected
from catalog.preprocess import DecodeLimits, _libjpeg, decode, sniff_format
from tests import photos as P

SIZE = (224, 224)


@pytest.fixture(scope="module")
def shelf_photo() -> Image.Image:
    return P.photo(P.store_photos()[0][0])


def pixels(data: bytes, limits: DecodeLimits | None = None) -> np.ndarray:
    return np.asarray(decode(data, SIZE, limits or DecodeLimits()).image, dtype=np.int16)


def test_output_is_rgb_at_model_size(shelf_photo):
    d = decode(P.encode(shelf_photo, "JPEG"), SIZE)
    assert d.image.mode == "RGB" and d.image.size == SIZE
    assert (d.width, d.height) == shelf_photo.size


def test_the_resize_is_pillow_s_bilinear_filter_within_a_grey_level():
    """decode() resizes with torch's uint8 path (faster than Pillow's on a CPU): the catalogues built
    before it, with Pillow, must see the same pixels, up to one grey level."""
    for path, _ in P.store_photos()[:6]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", SIZE)
            expected = np.asarray(img.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR), dtype=np.int16)
        d = decode(data, SIZE)
        assert d.pixels.dtype == torch.uint8 and tuple(d.pixels.shape) == (3, SIZE[1], SIZE[0])
        got = d.pixels.permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(got - expected).max() <= 1
        assert (got != expected).mean() < 0.01


def test_enlarging_takes_the_plain_bilinear_filter_which_gives_the_antialiased_pixels():
    """resized() skips antialiasing when it enlarges along both sides (facings smaller than the
    model's input): on uint8 (a CPU) it must not change a pixel; in float (a GPU) only a rounding
    at .5 may differ."""
    from torch.nn import functional as F

    from catalog.preprocess import resized

    frame = decode(P.store_photos()[0][0].read_bytes(), (300, 300)).pixels.unsqueeze(0)
    patches = [frame[:, :, :200, :200], frame[:, :, 50:250, 10:190], frame[:, :, :224, :100]]
    for patch in patches:
        for in_float in (False, True):
            got = resized(patch, (224, 224), in_float=in_float)
            cast = patch.float() if in_float else patch.contiguous(memory_format=torch.channels_last)
            want = F.interpolate(cast, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
            want = want.round().clamp(0, 255).to(torch.uint8)
            if in_float:
                assert (got.int() - want.int()).abs().max() <= 1
            else:
                assert torch.equal(got, want)


def test_a_plain_jpeg_decodes_to_pillow_s_exact_pixels():
    """Plain JPEGs that Pillow would not shrink are decoded by torchvision's libjpeg-turbo (faster):
    the same pixels as Pillow's, bit for bit, before any resize."""
    for path, _ in P.store_photos()[:6]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB"))
            size = img.size
            assert _libjpeg(img, data, size) is not None  # this photo takes that path
        got = decode(data, size).pixels.permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected)


def test_exif_orientation_is_applied(shelf_photo):
    upright = shelf_photo.crop((0, 0, 348, 200))  # landscape, so a wrong rotation shows
    d = decode(P.exif_rotated_jpeg(upright), SIZE)
    assert (d.width, d.height) == (348, 200)
    expected = np.asarray(upright.resize(SIZE, Image.Resampling.BILINEAR), dtype=np.int16)
    got = np.asarray(d.image, dtype=np.int16)
    assert np.abs(got - expected).mean() < 6  # JPEG noise only
    unrotated = np.asarray(upright.transpose(Image.Transpose.ROTATE_90).resize(SIZE), dtype=np.int16)
    assert np.abs(got - unrotated).mean() > 20  # and clearly not the stored orientation


def test_grayscale_8_and_16_bit_give_the_same_pixels(shelf_photo):
    gray8, gray16 = pixels(P.grayscale(shelf_photo)), pixels(P.gray16_png(shelf_photo))
    assert (gray8[..., 0] == gray8[..., 1]).all() and (gray8[..., 1] == gray8[..., 2]).all()
    assert np.abs(gray8 - gray16).max() <= 1  # 16-bit is scaled, not clipped to white
    assert gray16.mean() < 250


def test_cmyk_jpeg_converts_to_the_same_colours(shelf_photo):
    rgb = pixels(P.encode(shelf_photo, "JPEG", quality=95))
    assert np.abs(pixels(P.cmyk_jpeg(shelf_photo)) - rgb).mean() < 8


def test_transparent_pixels_become_white(shelf_photo):
    assert (pixels(P.rgba_png(shelf_photo, alpha=0)) == 255).all()
    opaque = pixels(P.rgba_png(shelf_photo, alpha=255))
    assert np.abs(opaque - pixels(P.encode(shelf_photo, "PNG"))).max() == 0


def test_palette_and_webp_and_one_pixel_images_decode(shelf_photo):
    assert np.abs(pixels(P.palette_png(shelf_photo)) - pixels(P.encode(shelf_photo, "PNG"))).mean() < 8
    assert np.abs(pixels(P.webp(shelf_photo)) - pixels(P.encode(shelf_photo, "PNG"))).mean() < 8
    assert (pixels(P.one_pixel()) == (200, 30, 30)).all()


def test_large_jpeg_is_decoded_with_draft_to_about_the_model_size():
    big = Image.new("RGB", (4000, 3000), (10, 120, 200))
    d = decode(P.encode(big, "JPEG"), SIZE)
    assert (d.width, d.height) == (4000, 3000) and d.image.size == SIZE


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda img: b"", "empty"),
        (lambda img: P.random_bytes(), "unsupported-format"),
        (P.truncated_jpeg, "corrupt-image"),
        (P.corrupt_body_jpeg, "corrupt-image"),
        (lambda img: P.png_bomb(100_000, 100_000), "decompression-bomb"),  # over Pillow's own limit
        (lambda img: P.png_bomb(9_000, 9_000), "decompression-bomb"),  # over ours (64 MP), under Pillow's
        (P.tiff, "unsupported-format"),
        (P.gif, "unsupported-format"),
        (lambda img: P.eps_header(), "unsupported-format"),
        (lambda img: P.svg(), "unsupported-format"),
        (lambda img: b"\xff\xd8\xff\xe0" + b"\x00" * 40, "corrupt-image"),  # JPEG magic, no image
    ],
    ids=["empty", "random", "truncated", "corrupt-body", "bomb-huge", "bomb-81MP", "tiff", "gif", "eps", "svg",
         "jpeg-magic-only"],
)
def test_poison_is_rejected_with_its_reason(shelf_photo, make, reason):
    with pytest.raises(ImageRejected) as info:
        decode(make(shelf_photo), SIZE)
    assert info.value.reason == reason
    assert str(info.value)  # a human-readable error travels with the code


def test_byte_limit_is_checked_before_decoding():
    with pytest.raises(ImageRejected) as info:
        decode(P.oversized(1000), SIZE, DecodeLimits(max_bytes=1000))
    assert info.value.reason == "too-large"


def test_allow_list_can_admit_more_formats(shelf_photo):
    data = P.tiff(shelf_photo)
    assert decode(data, SIZE, DecodeLimits(formats=("JPEG", "TIFF"))).image.size == SIZE


def test_magic_and_declared_format_must_agree(shelf_photo):
    """A PNG is refused when only JPEG is allowed, even though Pillow could read it."""
    with pytest.raises(ImageRejected) as info:
        decode(P.encode(shelf_photo, "PNG"), SIZE, DecodeLimits(formats=("JPEG",)))
    assert info.value.reason == "unsupported-format"
    assert sniff_format(P.encode(shelf_photo, "PNG")) == "PNG"
