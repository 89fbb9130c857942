"""Random views of reference photos (training the head only) and their place in embed_images."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from catalog.augment import Augmentation
from catalog.build import embed_images, references_from_folder
from catalog.embedder import Embedder
from catalog.models import load_backbone
from catalog.preprocess import decode
from tests.photos import REFERENCES

SIZE = (224, 224)
PATHS = [r.path for r in references_from_folder(REFERENCES)][:3]


def big(path, augmentation: Augmentation) -> torch.Tensor:
    return decode(path.read_bytes(), augmentation.decode_size(SIZE)).pixels


def test_views_are_reproducible_per_photo_and_differ_between_photos_and_seeds():
    a = Augmentation(seed=0)
    pixels = big(PATHS[0], a)
    first, again, other_index = a.view(pixels, SIZE, 7), a.view(pixels, SIZE, 7), a.view(pixels, SIZE, 8)
    other_seed = Augmentation(seed=1).view(pixels, SIZE, 7)
    assert first.shape == (3, 224, 224) and first.dtype == torch.uint8
    assert torch.equal(first, again)  # the feature cache relies on this
    assert not torch.equal(first, other_index)
    assert not torch.equal(first, other_seed)


def test_a_view_without_crop_or_colour_change_is_the_resized_photo_mirrored():
    plain = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, brightness=0, contrast=0, saturation=0,
                         hue=0, margin=1.0)
    pixels = big(PATHS[0], plain)
    assert torch.equal(plain.view(pixels, SIZE, 0), TF.horizontal_flip(pixels))


def test_crops_stay_inside_the_photo_and_keep_the_share_of_area_asked_for():
    a = Augmentation(scale=(0.4, 0.6))
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = a._crop_box(300, 400, rng)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.38 <= h * w / (300 * 400) <= 0.62  # rounding of the sides only


def test_embed_images_gives_one_view_per_file_in_file_order_and_caches_each_seed_apart(tmp_path):
    embedder = Embedder(load_backbone("resnet18", weights="none"), "cpu")
    plain = embed_images(PATHS, embedder, progress=False, cache=tmp_path)
    # Identity views (no crop, flip or colour change) must equal the photos themselves, row for row.
    identity = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0, contrast=0, saturation=0,
                            hue=0, margin=1.0)
    views = embed_images(PATHS, embedder, progress=False, cache=tmp_path, augmentation=identity)
    np.testing.assert_allclose(views, plain, atol=1e-5)
    seed0 = embed_images(PATHS, embedder, progress=False, cache=tmp_path, augmentation=Augmentation(seed=0))
    seed1 = embed_images(PATHS, embedder, progress=False, cache=tmp_path, augmentation=Augmentation(seed=1))
    assert len(list(tmp_path.glob("*.npy"))) == 4  # one cache entry per augmentation, none overwritten
    assert seed0.shape == plain.shape and not np.allclose(seed0, seed1, atol=1e-3)
    again = embed_images(PATHS, embedder, progress=False, cache=tmp_path / "fresh", augmentation=Augmentation(seed=1))
    np.testing.assert_allclose(again, seed1, atol=1e-5)  # recomputed, not only read back


def test_scale_outside_the_photo_is_refused():
    with pytest.raises(ValueError):
        Augmentation(scale=(0.5, 1.5))
