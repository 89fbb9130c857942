"""The Grocery Store Dataset's splits as (path, sku) rows, for quality reports and experiments.

The dataset (MIT, ``../shared/datasets/grocery-store``) has packshots, a train, a val and a test
split; the test split is held out on purpose and never read here.
"""
from __future__ import annotations

import csv
from pathlib import Path


def grocery_sets(dataset: Path) -> dict[str, list[tuple[Path, str]]]:
    """(path, sku) rows of packshots, train, packshots+train, and val (the test split is never read)."""
    with open(dataset / "classes.csv", newline="") as f:
        classes = list(csv.reader(f))[1:]
    name = {int(row[1]): row[0] for row in classes}
    packshots = [(dataset / row[4].lstrip("/"), row[0]) for row in classes]

    def split(file: str) -> list[tuple[Path, str]]:
        with open(dataset / file) as f:
            rows = [line.strip().split(", ") for line in f if line.strip()]
        return [(dataset / r[0], name[int(r[1])]) for r in rows]

    train = split("train.txt")
    return {"packshots": packshots, "train": train, "packshots+train": packshots + train, "val": split("val.txt")}
