"""Model-alone speed per batch size: what splitting CPU batches into power-of-two chunks costs.

``Embedder.embed`` on a CPU sends a batch to the network in chunks of 1, 2, 4, ..., 32 photos
(see catalog.embedder._power_of_two_chunks). This prints img/s for each of those sizes, and its
ratio to the rate at the largest, measured in one run on this machine.

    .venv/bin/python bench/chunk_sizes.py [--models efficientnet_lite0,resnet18] [--seconds 2.5]

Weights are `none` (speed does not depend on them); 224x224 uint8 inputs, fp32, eager.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog.embedder import Embedder  # noqa: E402
from catalog.models import load_backbone  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32)


def rate(embedder: Embedder, pixels: torch.Tensor, seconds: float) -> float:
    embedder.run_network(pixels)  # one untimed call: oneDNN sets up each shape once
    start, done = time.perf_counter(), 0
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            embedder.run_network(pixels)  # the network itself, one call at exactly this size
            done += pixels.shape[0]
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18")
    parser.add_argument("--seconds", type=float, default=2.5)
    args = parser.parse_args()
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | " + " | ".join(f"batch {s}" for s in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    pixels = torch.randint(0, 256, (max(SIZES), 3, 224, 224), dtype=torch.uint8)
    for name in args.models.split(","):
        embedder = Embedder(load_backbone(name, weights="none"), "cpu")
        rates = {s: rate(embedder, pixels[:s], args.seconds) for s in SIZES}
        top = rates[max(SIZES)]
        cells = [f"{rates[s]:.1f} img/s ({rates[s] / top:.2f}x)" for s in SIZES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nratio: img/s at that batch size / img/s at batch {max(SIZES)}")


if __name__ == "__main__":
    main()
