"""Experiment behind catalog.embedder._power_of_two_chunks: resident memory against batch shapes.

Embeds uint8 batches of a random size from 1 to 32 (the partial batches a service sees under a
varying load) on the CPU, and prints the process's resident memory every 100 batches. With
--whole, each batch goes to the network in one call, as before the split; without it, through
``Embedder.embed``, which splits it into power-of-two chunks. MobileNetV3-Small, random weights:
the shapes matter here, not the vectors. Not run by the tests (about 2 minutes on 2 cores).

    .venv/bin/python scripts/experiments/batch_shapes_rss.py [--whole] [BATCHES]   (default 1000)

Measured on 2 cores (glibc 2.36, torch 2.15): whole batches 802 -> 1,928 MB over 1,000 batches, still
climbing; split into powers of two, flat at 881 MB.
"""
from __future__ import annotations

import random
import sys

import psutil
import torch

from catalog.embedder import Embedder
from catalog.models import load_backbone


def main(argv: list[str]) -> None:
    whole = "--whole" in argv
    batches = int(next((a for a in argv if a.isdigit()), "1000"))
    torch.set_num_threads(2)
    embedder = Embedder(load_backbone("mobilenet_v3_small", weights="none"), "cpu")
    network = embedder.run_network
    pixels = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
    process = psutil.Process()
    rng = random.Random(0)
    print(f"{'batches':>8} {'rss MB':>8}   ({'one call per batch' if whole else 'power-of-two chunks'})")
    with torch.inference_mode():
        for i in range(batches + 1):
            part = pixels[:rng.randint(1, 32)]
            network(part) if whole else embedder.embed(part)
            if i % 100 == 0:
                print(f"{i:>8} {process.memory_info().rss / 1e6:>8.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
