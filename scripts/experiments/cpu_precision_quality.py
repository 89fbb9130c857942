"""Val top-1 of the catalogue's model on each CPU execution: torch fp32 (the catalogue's own path),
OpenVINO fp32 and OpenVINO bf16 (where the CPU has it), on the Grocery Store Dataset's val split
(the test split stays held out). The catalogue is built once, with torch, as `shelfmatch catalog
build` builds it; only the queries change runtime, as in the service.

    .venv/bin/python scripts/experiments/cpu_precision_quality.py [--models efficientnet_lite0] \
        [--dataset ../shared/datasets/grocery-store] [--references packshots+train]

Prints a table: top-1, top-5, the change of top-1 from torch in points, and the photos whose
top-1 product differs from torch's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from catalog.build import Reference, build_catalog, embed_images  # noqa: E402
from catalog.embedder import Embedder  # noqa: E402
from catalog.evaluate import product_scores, top_k_accuracy  # noqa: E402
from catalog.grocery import grocery_sets  # noqa: E402
from catalog.models import backbone_of  # noqa: E402
from catalog.runtime import native_bf16  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet_lite0")
    p.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "grocery-store")
    p.add_argument("--references", default="packshots", choices=("packshots", "packshots+train"))
    p.add_argument("--network-cache", type=Path, default=ROOT / "out" / "bench" / "networks")
    args = p.parse_args()
    sets = grocery_sets(args.dataset)
    refs = [Reference(path=path, sku=sku) for path, sku in sets[args.references]]
    val = sets["val"]
    runs = [("eager", "fp32"), ("openvino", "fp32")] + ([("openvino", "bf16")] if native_bf16() else [])
    print("| model | execution | precision | val top-1 | val top-5 | top-1 change (points) | top-1 product differs |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        catalog = build_catalog(refs, model=model, device="cpu", progress=False)
        truth = np.array([catalog.skus.index(sku) for _, sku in val])
        base_top1, base_best = None, None
        for execution, precision in runs:
            embedder = Embedder(backbone_of(catalog.fingerprint, catalog.weights_source), "cpu",
                                execution=execution, precision=precision, cache_dir=args.network_cache)
            vectors = embed_images([path for path, _ in val], embedder, progress=False)
            scores = product_scores(vectors, catalog.embeddings, catalog.row_sku, len(catalog.skus))
            top1, top5 = top_k_accuracy(scores, truth, 1), top_k_accuracy(scores, truth, 5)
            best = scores.argmax(axis=1)
            if base_top1 is None:
                base_top1, base_best = top1, best
            change = 100 * (top1 - base_top1)
            differs = int((best != base_best).sum())
            print(f"| {model} | {execution} | {precision} | {100 * top1:.2f}% | {100 * top5:.2f}% | "
                  f"{change:+.2f} | {differs}/{len(val)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
