"""The GPU-oriented path (bf16, CUDA graphs, batched JPEG decoding), exercised wherever it can run.

On a machine without a GPU the batched decoder runs torchvision's CPU libjpeg, which checks the
same contract (pixels near Pillow's, refusals handed back, verdicts unchanged). With
``SHELFMATCH_TEST_DEVICE=cuda`` (bench/gpu.py's device script sets it) the same tests run on the GPU.
"""
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from catalog.embedder import Embedder
from catalog.errors import ImageRejected
from catalog.jpeg_batch import JpegBatchDecoder
from catalog.models import load_backbone
from catalog.preprocess import (
    DecodeLimits,
    PlainJpeg,
    decode,
    decode_unless_plain_jpeg,
    probe_plain_jpeg,
)
from tests import photos as P

DEVICE = torch.device(os.environ.get("SHELFMATCH_TEST_DEVICE", "cpu"))
SIZE = (224, 224)


@pytest.fixture(scope="module")
def shelf():
    return P.photo(P.store_photos()[0][0])


@pytest.fixture(scope="module")
def store_jpegs() -> list[bytes]:
    return [path.read_bytes() for path, _ in P.store_photos()[:12]]


def pillow(data: bytes) -> torch.Tensor:
    return decode(data, SIZE).pixels


def test_store_photos_are_plain_jpegs_and_decode_to_nearly_pillows_pixels(store_jpegs):
    jpegs = [probe_plain_jpeg(d) for d in store_jpegs]
    assert all(isinstance(j, PlainJpeg) for j in jpegs)
    out = JpegBatchDecoder(DEVICE)(jpegs, SIZE)
    for img, data in zip(out, store_jpegs, strict=True):
        assert img.shape == (3, 224, 224) and img.dtype == torch.uint8 and img.device.type == DEVICE.type
        diff = (img.cpu().int() - pillow(data).int()).abs().float()
        assert diff.mean() < 2.0  # of 255: a different IDCT/resampler, not different content


def test_frames_of_several_sizes_in_one_batch_come_back_in_order_near_pillows_pixels(shelf):
    """Grouped by size for the resize, returned in input order; larger frames are where the two
    paths differ most (Pillow decodes them with draft, the device at full size)."""
    store = P.photo(P.store_photos()[-1][0])  # another product: a mix-up would show
    sizes = [(640, 480), (348, 348), (1920, 1080), (640, 480), (1280, 720)]
    frames = [P.encode((shelf if i % 2 else store).resize(s), "JPEG", quality=90) for i, s in enumerate(sizes)]
    out = JpegBatchDecoder(DEVICE)([probe_plain_jpeg(f) for f in frames], SIZE)
    for img, frame in zip(out, frames, strict=True):
        assert img.shape == (3, 224, 224)
        assert (img.cpu().int() - pillow(frame).int()).abs().float().mean() < 4.0


def test_a_resize_the_device_cannot_do_comes_back_as_none(store_jpegs, monkeypatch):
    import catalog.jpeg_batch as jb

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(jb.F, "interpolate", fail)
    out = JpegBatchDecoder(DEVICE)([probe_plain_jpeg(d) for d in store_jpegs[:3]], SIZE)
    assert out == [None, None, None]


def test_extreme_shapes_and_huge_frames_are_left_to_pillow(shelf):
    from PIL import Image

    strip = P.encode(Image.new("RGB", (60_000, 8), (90, 90, 90)), "JPEG")  # 268x shrink: beyond the kernel
    huge = P.encode(Image.new("RGB", (5000, 4000), (90, 90, 90)), "JPEG")  # 20 MP: draft is cheaper
    assert probe_plain_jpeg(strip) is None and probe_plain_jpeg(huge) is None
    assert probe_plain_jpeg(P.encode(shelf.resize((4000, 3000)), "JPEG")) is not None  # 12 MP


def test_a_body_the_decoder_refuses_comes_back_as_none_and_the_rest_still_decode(shelf, store_jpegs):
    bad = P.corrupt_body_jpeg(shelf)
    jpeg = probe_plain_jpeg(bad)
    assert jpeg is not None  # its header is fine: only decoding can tell
    out = JpegBatchDecoder(DEVICE)([probe_plain_jpeg(store_jpegs[0]), jpeg, probe_plain_jpeg(store_jpegs[1])], SIZE)
    assert out[1] is None and out[0] is not None and out[2] is not None
    with pytest.raises(ImageRejected) as info:  # what the pipeline then does with it
        decode(bad, SIZE)
    assert info.value.reason == "corrupt-image"


@pytest.mark.parametrize(
    "make",
    [
        P.cmyk_jpeg,
        P.exif_rotated_jpeg,
        P.truncated_jpeg,
        P.webp,
        lambda img: P.encode(img, "PNG"),
        lambda img: P.encode(img, "JPEG", progressive=True),
    ],
    ids=["cmyk", "exif-rotated", "truncated", "webp", "png", "progressive"],
)
def test_anything_but_a_plain_jpeg_is_left_to_pillow(shelf, make):
    data = make(shelf)
    assert probe_plain_jpeg(data) is None
    if make is P.truncated_jpeg:
        with pytest.raises(ImageRejected):
            decode_unless_plain_jpeg(data, SIZE)
        return
    once, twice = decode_unless_plain_jpeg(data, SIZE), decode(data, SIZE)  # one header parse, same result
    assert (once.width, once.height) == (twice.width, twice.height)
    assert np.array_equal(np.asarray(once.image), np.asarray(twice.image))


def test_a_plain_jpeg_is_deferred_with_its_bytes(store_jpegs):
    deferred = decode_unless_plain_jpeg(store_jpegs[0], SIZE)
    assert isinstance(deferred, PlainJpeg) and deferred.data is store_jpegs[0]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (P.random_bytes(), "unsupported-format"),
        (P.png_bomb(9_000, 9_000), "decompression-bomb"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "corrupt-image"),
    ],
    ids=["empty", "random", "bomb", "jpeg-magic-only"],
)
def test_the_probe_refuses_what_decode_refuses_with_the_same_reason(data, reason):
    with pytest.raises(ImageRejected) as probe:
        probe_plain_jpeg(data, DecodeLimits())
    with pytest.raises(ImageRejected) as full:
        decode(data, SIZE)
    with pytest.raises(ImageRejected) as either:
        decode_unless_plain_jpeg(data, SIZE)
    assert probe.value.reason == full.value.reason == either.value.reason == reason


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("mobilenet_v3_small", weights="none")  # random weights: numerics, not quality


def test_auto_settings_mean_openvino_on_a_cpu_eager_stays_fp32_and_graphs_need_cuda(backbone, tmp_path):
    from catalog.runtime import native_bf16

    e = Embedder(backbone, "cpu", precision="auto", execution="auto", cache_dir=tmp_path)
    bf16 = native_bf16() and backbone.cpu_bf16  # detected from the CPU, and only where verdicts keep
    assert (e.precision, e.execution, e.fixed_batch) == ("bf16" if bf16 else "fp32", "openvino", False)
    eager = Embedder(backbone, "cpu", precision="auto", execution="eager")
    assert (eager.precision, eager.fixed_batch) == ("fp32", False)  # torch's bf16 is slower on a CPU
    with pytest.raises(ValueError, match="CUDA"):
        Embedder(backbone, "cpu", execution="cuda-graph")


def test_fixed_batch_execution_refuses_to_run_before_its_warm_up(backbone):
    """Capturing or compiling lazily would happen mid-stream, while the decoder uses the device."""
    with pytest.raises(RuntimeError, match="warm_up"):
        Embedder(backbone, "cpu", execution="compile").embed(torch.zeros((1, 3, 224, 224), dtype=torch.uint8))


def test_photos_the_device_refuses_are_decoded_by_pillow_or_dead_lettered(backbone, shelf, store_jpegs):
    from catalog.build import Reference, catalog_from_vectors
    from catalog.matcher import Matcher
    from consumer.pipeline import Recognizer
    from consumer.source import DecodedPhoto, PendingJpeg, Poison

    class Refusing:
        def __call__(self, jpegs, size):
            return [None] * len(jpegs)

    refs = [Reference(path=P.store_photos()[0][0], sku="a")]
    catalog = catalog_from_vectors(refs, np.eye(1, backbone.fingerprint.dim, dtype=np.float32), backbone, "none")
    embedder = Embedder(backbone, "cpu")
    recognizer = Recognizer(embedder, Matcher(catalog, device=torch.device("cpu")), catalog, Refusing())
    batch = [
        PendingJpeg(jpeg=probe_plain_jpeg(d), fields={}, width=348, height=348, decode_s=0.0)
        for d in (store_jpegs[0], P.corrupt_body_jpeg(shelf))
    ]
    out, fallbacks = recognizer.decode_jpegs(batch, DecodeLimits())
    assert fallbacks == 2
    assert isinstance(out[0], DecodedPhoto) and torch.equal(out[0].pixels, pillow(store_jpegs[0]))
    assert isinstance(out[1], Poison) and out[1].reason == "corrupt-image"


@pytest.mark.parametrize("execution", ["eager", "cuda-graph", "compile"])
def test_bf16_and_fixed_batches_give_the_fp32_vectors_for_any_batch_length(backbone, store_jpegs, execution):
    if execution != "eager" and DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a GPU; compiling on a 2-core CPU takes minutes")
    torch.manual_seed(0)
    pixels = torch.stack([pillow(d) for d in store_jpegs])  # 12 photos
    reference = Embedder(backbone, DEVICE).embed(pixels).cpu()
    fast = Embedder(backbone, DEVICE, precision="bf16", execution=execution, batch_size=8)
    fast.warm_up()
    for n in (1, 5, 8, 12):  # shorter than, equal to and longer than the fixed batch
        got = fast.embed(pixels[:n]).cpu()
        assert got.shape == (n, reference.shape[1]) and got.dtype == torch.float32
        assert torch.allclose(got.norm(dim=1), torch.ones(n), atol=1e-3)
        assert F.cosine_similarity(got, reference[:n]).min() > 0.98


def test_joined_sizes_on_the_test_device_give_the_cpu_s_vectors(store_jpegs):
    """A catalogue at joined input sizes on the device it is served on (auto settings: OpenVINO on a
    CPU, eager torch on a GPU, fp32 on both) gives the vectors torch gives on the CPU; on a GPU the
    smaller size is resized in float, within a grey level of the CPU's uint8 resize."""
    joined = load_backbone("mobilenet_v3_small", weights="none", scales=(160, 224))
    pixels = torch.stack([pillow(d) for d in store_jpegs])  # decoded at 224, the largest size
    on_cpu = Embedder(joined, "cpu", execution="eager").embed(pixels)
    served = Embedder(joined, DEVICE, precision="auto", execution="auto")
    assert served.precision == "fp32" and served.execution == ("eager" if DEVICE.type == "cuda" else "openvino")
    served.warm_up()
    got = served.embed(pixels).cpu()
    assert got.shape == on_cpu.shape == (len(store_jpegs), 2 * joined.network_dim)
    assert F.cosine_similarity(got, on_cpu).min() > 0.995
