"""Experiment behind docs/quality-experiments.md ("Backbones, input sizes and pooling, with a head").

For each (backbone, input size) the final feature map of every reference (packshots + train split)
and val photo is pooled two ways (average, as the product does, and GeM with p = 3), for the photo
and its mirror image, and cached in out/quality/features/. Each variant is then scored on val:
frozen features (best reference per product), and a head trained with the product's settings
(catalog.head.train_head: 256-d, 30 epochs, scale 8, weight decay 0.01) over 3 seeds.
Concatenated variants join the unit vectors of several cached features before the head. For three
variants, the same heads are also scored by kNN voting over the nearest references.
Not part of the product, not run by the tests (about 4-9 minutes per feature set on 2 cores).

    .venv/bin/python scripts/experiments/features_scales.py
"""
from __future__ import annotations

import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from catalog.evaluate import product_scores, top_k_accuracy
from catalog.grocery import grocery_sets
from catalog.head import project, train_head
from catalog.models import load_backbone
from catalog.preprocess import decode

ROOT = Path(__file__).resolve().parents[2]

CACHE = ROOT / "out" / "quality" / "features"
SETS = ("packshots+train", "val")
FEATURES = [("efficientnet_lite0", 224), ("efficientnet_lite0", 320), ("efficientnet_lite0", 384),
            ("efficientnet_lite2", 260)]
VARIANTS = [  # label, feature sets (concatenated), pooling, mirror test-time augmentation
    ("lite0 @224 (the product's default)", [0], "avg", False),
    ("lite0 @224, GeM", [0], "gem", False),
    ("lite0 @224, mirror TTA", [0], "avg", True),
    ("lite0 @320", [1], "avg", False),
    ("lite0 @384", [2], "avg", False),
    ("lite2 @260", [3], "avg", False),
    ("lite0 @224 + lite0 @320", [0, 1], "avg", False),
    ("lite0 @224 + lite2 @260", [0, 3], "avg", False),
    ("lite0 @224 + lite2 @260, GeM, mirror TTA", [0, 3], "gem", True),
    ("lite0 @224 + lite0 @320 + lite2 @260", [0, 1, 3], "avg", False),
    ("lite0 @224 + lite0 @320 + lite0 @384", [0, 1, 2], "avg", False),
    ("lite0 @384 + lite2 @260", [2, 3], "avg", False),
    ("all four", [0, 1, 2, 3], "avg", False),
    ("all four, GeM, mirror TTA", [0, 1, 2, 3], "gem", True),
]
VOTING = ("lite0 @224 (the product's default)", "lite0 @384", "all four, GeM, mirror TTA")


def features(name: str, size: int) -> Path:
    path = CACHE / f"{name}-{size}.npz"
    if path.exists():
        return path
    torch.set_num_threads(2)
    sets = grocery_sets(ROOT.parent / "shared" / "datasets" / "grocery-store")
    backbone = load_backbone(name, input_size=size)
    net, pre = backbone.network.eval(), backbone.fingerprint.preprocessing
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)

    def pixels(p: Path) -> torch.Tensor:
        return decode(p.read_bytes(), (size, size)).pixels

    out = {}
    for key in SETS:
        rows, pooled = sets[key], {k: [] for k in ("avg", "gem", "avg_m", "gem_m")}
        with ThreadPoolExecutor(2) as pool, torch.inference_mode():
            for s in range(0, len(rows), 32):
                x = (torch.stack(list(pool.map(lambda r: pixels(r[0]), rows[s : s + 32]))).float() / 255 - mean) / std
                for suffix, batch in (("", x), ("_m", x.flip(-1))):
                    fmap = net.forward_features(batch)
                    pooled["avg" + suffix].append(fmap.mean((2, 3)))
                    pooled["gem" + suffix].append(fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))
        out.update({f"{key}/{k}": torch.cat(v).numpy() for k, v in pooled.items()})
        out[f"{key}/sku"] = np.array([sku for _, sku in rows])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return path


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vectors(files: list[Path], key: str, pool: str, mirror: bool) -> np.ndarray:
    parts = []
    for f in files:
        z = np.load(f)
        v = unit(z[f"{key}/{pool}"])
        parts.append(unit(v + unit(z[f"{key}/{pool}_m"])) if mirror else v)
    return unit(np.concatenate(parts, axis=1))


def top_1_5(refs: np.ndarray, ref_y: np.ndarray, queries: np.ndarray, query_y: np.ndarray) -> tuple[float, float]:
    """Val top-1 and top-5 %, each product scored by its best reference (as `shelfmatch eval` does)."""
    scores = product_scores(queries, refs, ref_y, int(ref_y.max()) + 1)
    return 100 * top_k_accuracy(scores, query_y, 1), 100 * top_k_accuracy(scores, query_y, 5)


def vote(refs: np.ndarray, ref_y: np.ndarray, queries: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """kNN voting: each product scores the sum of exp((s - 1) / T) over its references among the k nearest."""
    sims = queries @ refs.T
    nearest = np.argsort(-sims, axis=1)[:, :k]
    scores = np.zeros((len(queries), int(ref_y.max()) + 1))
    for i, row in enumerate(nearest):
        np.add.at(scores[i], ref_y[row], np.exp((sims[i, row] - 1) / temperature))
    return scores


def main() -> int:
    files = [features(name, size) for name, size in FEATURES]
    skus = np.load(files[0])
    index = {s: i for i, s in enumerate(sorted(set(skus["packshots+train/sku"])))}
    ref_y = np.array([index[s] for s in skus["packshots+train/sku"]])
    val_y = np.array([index[s] for s in skus["val/sku"]])
    voted = defaultdict(list)
    print("| variant | dim | frozen top-1 % | head top-1 % (seeds 0 / 1 / 2) | head top-1 % mean | head top-5 % mean |")
    print("|---|---|---|---|---|---|")
    for label, which, pool, mirror in VARIANTS:
        chosen = [files[i] for i in which]
        refs = vectors(chosen, "packshots+train", pool, mirror)
        val = vectors(chosen, "val", pool, mirror)
        frozen = top_1_5(refs, ref_y, val, val_y)
        heads = []
        for seed in (0, 1, 2):
            head = train_head(refs, ref_y, out_dim=256, epochs=30, scale=8.0, weight_decay=1e-2, seed=seed)
            z_refs, z_val = project(head, refs), project(head, val)
            heads.append(top_1_5(z_refs, ref_y, z_val, val_y))
            if label in VOTING:
                for k, t in ((10, 0.05), (30, 0.05), (30, 0.1)):
                    voted[(label, k, t)].append(100 * top_k_accuracy(vote(z_refs, ref_y, z_val, k, t), val_y, 1))
        seeds = " / ".join(f"{h[0]:.1f}" for h in heads)
        print(f"| {label} | {refs.shape[1]} | {frozen[0]:.1f} | {seeds} | {np.mean([h[0] for h in heads]):.1f} | "
              f"{np.mean([h[1] for h in heads]):.1f} |", flush=True)
    print("\nkNN voting instead of the best reference per product (same heads):\n")
    print("| variant | k | T | head top-1 % (seeds 0 / 1 / 2) | mean |")
    print("|---|---|---|---|---|")
    for (label, k, t), accs in voted.items():
        print(f"| {label} | {k} | {t} | {' / '.join(f'{a:.1f}' for a in accs)} | {np.mean(accs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
