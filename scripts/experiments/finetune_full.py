"""Experiment for docs/quality-experiments.md: fine-tune all of EfficientNet-Lite0 on a CPU.

The research's proposed next step, done whole: every layer trained, with photo-level augmentation
(random resized crop, mirror, colour jitter) on the references (packshots + train split), by a
normalised-softmax loss over the 81 products on the penultimate 1280 values (no extra head, so the
result is a plain weights file the catalogue can name). Prints val top-1/top-5 of nearest-reference
matching, as ``shelfmatch eval`` measures it, before training and after the last epoch. Not part of
the product, not run by the tests.

    .venv/bin/python scripts/experiments/finetune_full.py [EPOCHS] [--save PATH]   (default 6)
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from catalog.evaluate import product_scores, top_k_accuracy
from catalog.grocery import grocery_sets
from catalog.models import load_backbone
from catalog.preprocess import decode

ROOT = Path(__file__).resolve().parents[2]

DATA = ROOT.parent / "shared" / "datasets" / "grocery-store"
STORED = (256, 256)  # decoded once at this size; crops of it are resized to the model's 224


def splits() -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    sets = grocery_sets(DATA)
    return sets["packshots+train"], sets["val"]


def load_all(rows: list[tuple[Path, str]], size: tuple[int, int]) -> torch.Tensor:
    with ThreadPoolExecutor(2) as pool:
        return torch.stack(list(pool.map(lambda r: decode(r[0].read_bytes(), size).pixels, rows)))


def main(argv: list[str]) -> None:
    epochs = int(next((a for a in argv if a.isdigit()), "6"))
    save = Path(argv[argv.index("--save") + 1]) if "--save" in argv else None
    torch.manual_seed(0)
    torch.set_num_threads(2)
    references, val = splits()
    skus = sorted({s for _, s in references})
    index = {s: i for i, s in enumerate(skus)}
    y_ref = torch.tensor([index[s] for _, s in references])
    y_val = torch.tensor([index[s] for _, s in val])
    backbone = load_backbone("efficientnet_lite0", weights="imagenet")
    net = backbone.network.to(memory_format=torch.channels_last)
    pre = backbone.fingerprint.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255

    t0 = time.time()
    stored = load_all(references, STORED)
    ref_pixels, val_pixels = load_all(references, pre.size), load_all(val, pre.size)
    print(f"decoded {len(references)} references and {len(val)} val photos in {time.time() - t0:.0f}s", flush=True)

    def features(pixels: torch.Tensor) -> torch.Tensor:
        x = ((pixels.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        return F.normalize(net(x), dim=1)

    def evaluate() -> tuple[float, float]:
        net.eval()
        with torch.inference_mode():
            refs = torch.cat([features(ref_pixels[i:i + 64]) for i in range(0, len(ref_pixels), 64)])
            queries = torch.cat([features(val_pixels[i:i + 64]) for i in range(0, len(val_pixels), 64)])
        scores = product_scores(queries.numpy(), refs.numpy(), y_ref.numpy(), len(skus))
        return top_k_accuracy(scores, y_val.numpy(), 1), top_k_accuracy(scores, y_val.numpy(), 5)

    print(f"before: val top-1 / top-5 {evaluate()}", flush=True)
    augment = v2.Compose([
        v2.RandomResizedCrop(pre.size[::-1], scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02),
    ])
    proxies = torch.nn.Parameter(torch.randn(len(skus), net(torch.zeros(1, 3, 224, 224)).shape[1]) * 0.01)
    batch = 32
    steps = epochs * ((len(stored) + batch - 1) // batch)
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": 2e-4}, {"params": [proxies], "lr": 1e-2}],
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-4, 1e-2], total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        net.train()
        t0, total = time.time(), 0.0
        order = torch.randperm(len(stored))
        for start in range(0, len(stored), batch):
            pick = order[start:start + batch]
            pixels = torch.stack([augment(stored[i]) for i in pick])
            logits = 16 * features(pixels) @ F.normalize(proxies, dim=1).T
            loss = F.cross_entropy(logits, y_ref[pick], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(pick)
        print(f"epoch {epoch}: loss {total / len(stored):.3f}, {time.time() - t0:.0f}s", flush=True)
    print(f"after {epochs} epochs: val top-1 / top-5 {evaluate()}", flush=True)
    if save:
        torch.save(net.state_dict(), save)
        print(f"saved {save}")


if __name__ == "__main__":
    main(sys.argv[1:])
