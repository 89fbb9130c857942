"""Experiment behind docs/quality-experiments.md ("Joined scales through the product's path", issue #17).

Each recipe is a `shelfmatch catalog build --input-size SIZES` as the product makes it: EfficientNet-Lite0
with ImageNet weights at one or several square input sizes, the photo decoded at the largest and the
smaller sizes resized from it as uint8, the unit features of each size joined (catalog/embedder.py).
For each recipe:

- the references (packshots + train photos) and the val photos are embedded by OpenVINO at fp32 (the
  catalogue's vectors; parity with torch's fp32 is tested in tests/unit/test_runtime.py), and the val
  photos also at bf16, as the consumer embeds them by default on a CPU with native bf16;
- a head is trained with `catalog train-head`'s defaults (256-d, 30 epochs, scale 8, weight decay 0.01)
  for each of 3 seeds; top-1 / top-5 of val photo against every reference (best reference per product);
- the operating point for 95% precision, 2-fold cross-validated on val (as docs/quality.md);
- top-1 when each product is scored by the proxy its head was trained against instead of its best
  reference (the multi-seed check that docs/quality-experiments.md asked for);
- the network alone in OpenVINO bf16 and fp32 at batch 32 (img/s, best of 3), in the same run.

    .venv/bin/python scripts/experiments/joined_scales.py [--recipes 224 384 224,320 224,320,384]

The test split is never read. Vectors are cached in out/quality/joined/ by fingerprint and files.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from catalog.build import embed_images
from catalog.embedder import Embedder
from catalog.evaluate import cross_validated_calibration, product_scores, top_k_accuracy
from catalog.grocery import grocery_sets
from catalog.head import project, train_head
from catalog.models import load_backbone

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "out" / "quality" / "joined"
SEEDS = (0, 1, 2)


def recipe_backbone(recipe: str):
    sizes = tuple(int(s) for s in recipe.split(","))
    return load_backbone("efficientnet_lite0", scales=sizes)


def rate(embedder: Embedder, batch: int = 32, repeats: int = 3) -> float:
    width, height = embedder.input_size
    x = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)
    embedder.run_network(x)  # warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            embedder.run_network(x)
        best = min(best, (time.perf_counter() - start) / 4)
    return batch / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "grocery-store"))
    parser.add_argument("--recipes", nargs="+", default=["224", "384", "224,320", "224,384", "224,320,384"])
    args = parser.parse_args()
    sets = grocery_sets(Path(args.dataset))
    refs, val = sets["packshots+train"], sets["val"]
    skus = sorted({sku for _, sku in refs})
    index = {s: i for i, s in enumerate(skus)}
    ref_y = np.array([index[s] for _, s in refs])
    val_y = np.array([index[s] for _, s in val])
    print(f"{len(refs)} references, {len(val)} val photos, {len(skus)} products; "
          f"torch threads {torch.get_num_threads()}")
    print("| recipe | dim | compute vs 224 | bf16 img/s | fp32 img/s | head top-1 % fp32 queries (seeds) | mean | "
          "top-5 mean | mean top-1 bf16 queries | precision / recall % at 95% (2 folds, mean of seeds) | "
          "top-1 % by proxy (seeds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base_cost = None
    for recipe in args.recipes:
        backbone = recipe_backbone(recipe)
        fp32 = Embedder(backbone, "cpu", execution="openvino", precision="fp32", cache_dir=CACHE / "networks")
        bf16 = Embedder(backbone, "cpu", execution="openvino", precision="bf16", cache_dir=CACHE / "networks")
        speeds = {"bf16": rate(bf16), "fp32": rate(fp32)}
        cost = 1 / speeds["fp32"]
        base_cost = base_cost or cost
        # The cache is keyed by fingerprint, which precision is not part of: one folder per precision.
        ref_x = embed_images([p for p, _ in refs], fp32, cache=CACHE / "fp32", progress=False)
        queries = {"fp32": embed_images([p for p, _ in val], fp32, cache=CACHE / "fp32", progress=False),
                   "bf16": embed_images([p for p, _ in val], bf16, cache=CACHE / "bf16", progress=False)}
        top1: dict[str, list[float]] = {"fp32": [], "bf16": []}
        top5, points, by_proxy = [], [], []
        for seed in SEEDS:
            head = train_head(ref_x, ref_y, out_dim=256, epochs=30, scale=8.0, weight_decay=1e-2, seed=seed)
            refs_h = project(head, ref_x)
            for precision, q in queries.items():
                scores = product_scores(project(head, q), refs_h, ref_y, len(skus))
                top1[precision].append(100 * top_k_accuracy(scores, val_y, 1))
                if precision == "fp32":
                    top5.append(100 * top_k_accuracy(scores, val_y, 5))
                    points += cross_validated_calibration(scores, val_y, target_precision=0.95)
                    # A product scored by its trained proxy alone instead of its best reference.
                    assert head.proxies is not None
                    proxy_scores = project(head, q) @ head.proxies.numpy().T
                    by_proxy.append(100 * top_k_accuracy(proxy_scores, val_y, 1))
        precision = 100 * np.mean([p["precision"] for p in points])
        recall = 100 * np.mean([p["recall"] for p in points])
        print(f"| lite0 @{recipe.replace(',', '+')} | {backbone.fingerprint.dim} | {cost / base_cost:.2f}x | "
              f"{speeds['bf16']:.0f} | {speeds['fp32']:.0f} | {' / '.join(f'{t:.1f}' for t in top1['fp32'])} | "
              f"{np.mean(top1['fp32']):.1f} | {np.mean(top5):.1f} | {np.mean(top1['bf16']):.1f} | "
              f"{precision:.1f} / {recall:.1f} | {' / '.join(f'{t:.1f}' for t in by_proxy)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
