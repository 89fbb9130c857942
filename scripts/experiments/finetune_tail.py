"""Experiment behind docs/quality-experiments.md ("Fine-tuning the backbone's last stages on a CPU").

Fine-tunes EfficientNet-Lite0's stages 5-6 and head convolution, plus a 256-d linear head, on cached
stage-4 activations of the references (packshots + train split) and their mirror images; prints val
top-1/top-5 after each epoch. Not part of the product, not run by the tests (about 15 minutes on 2 cores).

    .venv/bin/python scripts/experiments/finetune_tail.py [EPOCHS]      (default 6; the log used 5)
"""

import copy
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from catalog.evaluate import product_scores, top_k_accuracy
from catalog.grocery import grocery_sets
from catalog.models import load_backbone
from catalog.preprocess import decode

ROOT = Path(__file__).resolve().parents[2]
torch.manual_seed(0)

SETS = grocery_sets(ROOT.parent / "shared" / "datasets" / "grocery-store")
train, val = SETS["packshots+train"], SETS["val"]
skus = sorted({s for _, s in train})
idx = {s: i for i, s in enumerate(skus)}
b = load_backbone("efficientnet_lite0", weights="imagenet")
net = b.network.eval()
pre = b.fingerprint.preprocessing
mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
std = torch.tensor(pre.std).view(1, 3, 1, 1)


def stem(x):
    x = net.conv_stem(x)
    x = net.bn1(x)
    for blk in net.blocks[:5]:
        x = blk(x)
    return x


def load(p, flip=False):
    t = decode(open(p, "rb").read(), pre.size).pixels
    return t.flip(-1) if flip else t


def cache(rows, flip=False):
    out = []
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        for s in range(0, len(rows), 32):
            px = torch.stack(list(pool.map(lambda r: load(r[0], flip), rows[s : s + 32]))).float() / 255
            out.append(stem((px - mean) / std))
    return torch.cat(out)


t0 = time.time()
CACHE = ROOT / ".cache" / "finetune-tail-activations.pt"
if CACHE.exists():
    Xtr, Xva = torch.load(CACHE)
else:
    Xtr = torch.cat([cache(train), cache(train, flip=True)])
    Xva = cache(val)
    CACHE.parent.mkdir(exist_ok=True)
    torch.save((Xtr, Xva), CACHE)
ytr = torch.tensor([idx[s] for _, s in train] * 2)
yva = torch.tensor([idx[s] for _, s in val])
print("cached", Xtr.shape, Xva.shape, f"{time.time() - t0:.0f}s", flush=True)
tail = torch.nn.Sequential(
    copy.deepcopy(net.blocks[5]), copy.deepcopy(net.blocks[6]), copy.deepcopy(net.conv_head), copy.deepcopy(net.bn2)
)
head = torch.nn.Linear(1280, 256)
proxies = torch.nn.Parameter(torch.randn(len(skus), 256) * 0.01)


def embed(x):
    z = tail(x).mean((2, 3))
    return F.normalize(head(F.normalize(z, dim=1)), dim=1)


def evaluate():
    tail.eval()
    head.eval()
    with torch.inference_mode():
        R = torch.cat(
            [embed(Xtr[i : min(i + 256, len(train))]) for i in range(0, len(train), 256)]
        )  # un-flipped references
        Q = torch.cat([embed(Xva[i : i + 256]) for i in range(0, len(Xva), 256)])
        P = product_scores(Q.numpy(), R.numpy(), np.array([idx[s] for _, s in train]), len(skus))
        return top_k_accuracy(P, yva.numpy(), 1), top_k_accuracy(P, yva.numpy(), 5)


opt = torch.optim.AdamW(
    [{"params": tail.parameters(), "lr": 3e-4}, {"params": [*head.parameters(), proxies], "lr": 2e-3}],
    weight_decay=1e-2,
)
EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
steps = EPOCHS * ((len(Xtr) + 63) // 64)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-4, 2e-3], total_steps=steps)
for ep in range(EPOCHS):
    tail.train()
    head.train()
    t0 = time.time()
    perm = torch.randperm(len(Xtr))
    for s in range(0, len(Xtr), 64):
        i = perm[s : s + 64]
        x = Xtr[i]
        # cheap augmentation on the cached activations: random spatial crop-shift of the 14x14 map
        dx, dy = np.random.randint(0, 3, 2)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")[:, :, dy : dy + 14, dx : dx + 14]
        logits = 8 * embed(x) @ F.normalize(proxies, dim=1).T
        loss = F.cross_entropy(logits, ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"epoch {ep} loss {loss.item():.3f} {time.time() - t0:.0f}s val top1/top5 {evaluate()}", flush=True)
