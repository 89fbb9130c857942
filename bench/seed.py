"""The research's two speed tables, re-measured on whatever device is present.

Table 1: time to embed 3000 images at batch 32 with ResNet-18/50/101/152 (224x224 inputs).
Table 2: 3000 x 100 cosine similarities, element-wise (one pair at a time) vs one matrix product.

    .venv/bin/python bench/seed.py [--images 3000] [--device auto]

On a small CPU, ``--images`` below 3000 measures fewer batches and scales the time to 3000
(the table says so). Weights are `none`: speed does not depend on them. Writes out/bench/seed.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog.embedder import Embedder, resolve_device  # noqa: E402
from catalog.models import load_backbone  # noqa: E402

RESEARCH_T1 = {"resnet18": None, "resnet50": 17.1, "resnet101": None, "resnet152": None}  # GTX 1050 Ti, seconds
RESEARCH_T2 = {"elementwise_s": 25.4, "matmul_s": 0.7}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table1(models: list[str], images: int, device: torch.device) -> list[dict]:
    rows = []
    batch = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
    for name in models:
        embedder = Embedder(load_backbone(name, weights="none"), device)
        embedder.embed(batch)  # warm-up
        sync(device)
        batches = max(1, images // 32)
        start = time.perf_counter()
        for _ in range(batches):
            embedder.embed(batch)
        sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "model": name,
                "images_measured": batches * 32,
                "seconds_for_3000": seconds * 3000 / (batches * 32),
                "img_s": batches * 32 / seconds,
                "research_s": RESEARCH_T1.get(name),
            }
        )
        print(
            f"{name:10s} {rows[-1]['seconds_for_3000']:8.2f} s for 3000 images ({rows[-1]['img_s']:.1f} img/s)",
            flush=True,
        )
    return rows


def table2(dim: int = 2048) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, dim)).astype(np.float32)
    y = rng.normal(size=(100, dim)).astype(np.float32)
    start = time.perf_counter()
    s = np.empty((3000, 100), dtype=np.float32)
    for i in range(3000):
        for j in range(100):
            a, b = x[i], y[j]
            s[i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    elementwise = time.perf_counter() - start
    start = time.perf_counter()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    m = xn @ yn.T
    matmul = time.perf_counter() - start
    assert np.allclose(m, s, atol=1e-4)
    print(
        f"3000 x 100: element-wise {elementwise:.2f} s, one matmul {matmul * 1e3:.2f} ms ({elementwise / matmul:.0f}x)",
        flush=True,
    )
    return {"elementwise_s": elementwise, "matmul_s": matmul, "ratio": elementwise / matmul, "research": RESEARCH_T2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--models", default="resnet18,resnet50,resnet101,resnet152")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "table1": table1(a.models.split(","), a.images, device),
        "table2": table2(),
    }
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'seed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
