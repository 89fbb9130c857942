"""The catalogue watcher's decisions, on real files: what is swapped in, and what leaves the old
catalogue serving (a corrupt, half-written, removed or other model's file)."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from catalog.embedder import Embedder
from catalog.matcher import Matcher, device_bytes
from catalog.models import load_backbone
from catalog.store import Calibration, Catalog
from consumer.metrics import Metrics
from consumer.pipeline import Recognizer
from consumer.watcher import DEVICE_HEADROOM_BYTES, CatalogWatcher, FileIdentity, SwapResult, judge
from tests.unit.test_matcher import unit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(load_backbone("mobilenet_v3_small", weights="none"), CPU, batch_size=4)


def catalog_for(embedder: Embedder, products: int, seed: int, fingerprint=None,
                calibration: Calibration | None = Calibration(0.7, 0.0)) -> Catalog:  # noqa: B008 - frozen value
    fp = fingerprint or embedder.fingerprint
    rows = unit(np.random.default_rng(seed).normal(size=(products, fp.dim))).astype(np.float32)
    return Catalog(embeddings=rows, row_sku=np.arange(products, dtype=np.int32),
                   skus=tuple(f"sku-{seed}-{i}" for i in range(products)), fingerprint=fp, calibration=calibration)


def atomic_write(catalog_or_bytes: Catalog | bytes, path) -> None:
    """As an operator ships a file: written under another name, then renamed over the path."""
    tmp = path.with_name(path.name + ".new")
    if isinstance(catalog_or_bytes, Catalog):
        catalog_or_bytes.save(tmp)
    else:
        tmp.write_bytes(catalog_or_bytes)
    os.replace(tmp, path)


@pytest.fixture
def setup(tmp_path, embedder):
    path = tmp_path / "catalog.safetensors"
    first = catalog_for(embedder, 5, seed=0)
    first.save(path)
    metrics = Metrics(CollectorRegistry())
    recognizer = Recognizer(embedder, Matcher(first, device=CPU), first)
    metrics.catalog_serving(version=first.version, model=first.fingerprint.backbone, products=5, references=5,
                            device_bytes=recognizer.matcher.device_bytes)
    watcher = CatalogWatcher(path, recognizer, pool=None, metrics=metrics, poll_s=1.0, top_k=3, threshold=None,
                             min_margin=None, seen=FileIdentity.of(path))
    return path, first, recognizer, watcher, metrics


def swaps(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("shelfmatch_catalog_swaps_total", {"result": result}) or 0.0


def test_judge_swaps_only_the_same_model_when_it_fits(embedder):
    a = catalog_for(embedder, 3, seed=0)
    serving = Recognizer(embedder, Matcher(a, device=CPU), a).serving
    b = catalog_for(embedder, 4, seed=1)
    other = catalog_for(embedder, 3, seed=2, fingerprint=replace(a.fingerprint, weights="other-checkpoint"))
    assert judge(serving, b, free_bytes=None, needed_bytes=10**12) is None  # a CPU: memory not checked
    assert judge(serving, a, free_bytes=None, needed_bytes=1) is SwapResult.UNCHANGED
    recalibrated = replace(a, calibration=Calibration(0.7, 0.01))  # same version, new operating point
    assert judge(serving, recalibrated, free_bytes=None, needed_bytes=1) is None
    assert judge(serving, other, free_bytes=None, needed_bytes=1) is SwapResult.OTHER_MODEL
    assert judge(serving, b, free_bytes=10**9, needed_bytes=10**9 - DEVICE_HEADROOM_BYTES) is None
    assert judge(serving, b, free_bytes=10**9, needed_bytes=10**9) is SwapResult.NO_MEMORY


def test_a_million_products_on_a_gpu():
    cuda = torch.device("cuda")
    assert device_bytes(1_000_000, 1280, cuda) == 2_568_000_000  # Lite0: fp16 matrix + int64 row index
    assert device_bytes(1_000_000, 2048, cuda) == 4_104_000_000  # ResNet-50
    assert device_bytes(1_000_000, 2048, CPU) == 8_200_000_000  # fp32 on a CPU


async def test_renamed_file_is_swapped_in_and_metrics_name_only_it(setup, embedder):
    path, first, recognizer, watcher, metrics = setup
    assert await watcher.check() is None  # nothing changed yet
    second = catalog_for(embedder, 7, seed=1)
    atomic_write(second, path)
    assert await watcher.check() is SwapResult.SWAPPED
    assert recognizer.serving.ref.version == second.version and recognizer.serving.products == 7
    assert recognizer.matcher.skus == second.skus
    reg = metrics.registry
    assert reg.get_sample_value("shelfmatch_catalog_info", {"version": second.version, "model": "mobilenet_v3_small"})
    assert reg.get_sample_value("shelfmatch_catalog_info", {"version": first.version,
                                                            "model": "mobilenet_v3_small"}) is None
    assert reg.get_sample_value("shelfmatch_catalog_products") == 7
    assert reg.get_sample_value("shelfmatch_catalog_references") == 7
    assert reg.get_sample_value("shelfmatch_catalog_swap_seconds_count") == 1
    assert swaps(metrics, "swapped") == 1
    atomic_write(second, path)  # the same version again
    assert await watcher.check() is SwapResult.UNCHANGED
    assert recognizer.serving.ref.version == second.version


async def test_a_flipped_symlink_is_swapped_in(tmp_path, setup, embedder):
    path, _, recognizer, watcher, _ = setup
    versions = []
    for seed in (1, 2):
        target = tmp_path / f"v{seed}.safetensors"
        catalog_for(embedder, 4, seed=seed).save(target)
        link = tmp_path / "link.tmp"
        link.symlink_to(target.name)
        os.replace(link, path)  # how a ConfigMap's ..data symlink flips: atomically
        assert await watcher.check() is SwapResult.SWAPPED
        versions.append(recognizer.serving.ref.version)
    assert versions == [catalog_for(embedder, 4, seed=s).version for s in (1, 2)]


async def test_bad_files_leave_the_old_catalogue_serving(setup, embedder):
    path, first, recognizer, watcher, metrics = setup
    good = catalog_for(embedder, 6, seed=3)
    good.save(path.with_name("good.safetensors"))
    whole = path.with_name("good.safetensors").read_bytes()

    atomic_write(b"\x00" * 64 + os.urandom(2048), path)  # corrupt
    assert await watcher.check() is SwapResult.INVALID
    path.write_bytes(whole[: len(whole) // 2])  # half-written in place (not how to ship one, but it happens)
    assert await watcher.check() is SwapResult.INVALID
    other = catalog_for(embedder, 6, seed=4, fingerprint=load_backbone("resnet18", weights="none").fingerprint)
    atomic_write(other, path)  # another model's catalogue
    assert await watcher.check() is SwapResult.OTHER_MODEL
    path.unlink()  # removed
    assert await watcher.check() is SwapResult.MISSING
    assert await watcher.check() is None  # said once, not at every poll
    assert recognizer.serving.ref.version == first.version  # through all of it
    assert [swaps(metrics, r) for r in ("invalid", "other_model", "missing", "swapped")] == [2, 1, 1, 0]

    path.write_bytes(whole)  # and a good file afterwards is taken
    assert await watcher.check() is SwapResult.SWAPPED
    assert recognizer.serving.ref.version == good.version


async def test_swapped_catalogue_takes_its_own_calibration_unless_configured(setup, embedder):
    path, _, recognizer, watcher, _ = setup
    calibrated = replace(catalog_for(embedder, 3, seed=5), calibration=Calibration(0.61, 0.03))
    atomic_write(calibrated, path)
    assert await watcher.check() is SwapResult.SWAPPED
    assert (recognizer.matcher.threshold, recognizer.matcher.min_margin) == (0.61, 0.03)
    watcher.threshold = 0.9  # as SHELFMATCH_THRESHOLD would
    atomic_write(replace(calibrated, calibration=Calibration(0.5, 0.0)), path)
    assert await watcher.check() is SwapResult.SWAPPED
    assert (recognizer.matcher.threshold, recognizer.matcher.min_margin) == (0.9, 0.0)


async def test_an_uncalibrated_catalogue_is_refused_unless_a_threshold_is_set(setup, embedder):
    path, first, recognizer, watcher, metrics = setup
    atomic_write(catalog_for(embedder, 4, seed=6, calibration=None), path)
    assert await watcher.check() is SwapResult.UNCALIBRATED
    assert recognizer.serving.ref.version == first.version
    watcher.threshold = 0.8  # as SHELFMATCH_THRESHOLD would
    atomic_write(catalog_for(embedder, 4, seed=7, calibration=None), path)
    assert await watcher.check() is SwapResult.SWAPPED
    assert recognizer.matcher.threshold == 0.8


def test_every_swap_result_is_exported_from_the_start():
    from consumer.metrics import SWAP_RESULTS

    assert set(SWAP_RESULTS) == {r.value for r in SwapResult}
