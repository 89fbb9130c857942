"""OpenVINO's photos per inference: the network's rate and the serving memory per slice size.

``OpenVinoNetwork`` runs a batch in slices of at most ``rows`` photos, one after the other; an
inference request keeps buffers for the largest slice it has run. For each backbone, precision and
slice size, measured in one run on this machine:

- img/s of ``Embedder.embed`` (the service's path) on batches of 32 store-photo-sized uint8
  inputs, the slice sizes alternated within one process, ``--repeat`` rounds (best and median);
- the resident memory of a fresh process that builds the same embedder, warms it up as the service
  does (every chunk size of a CPU batch) and embeds 10 full batches: the largest RSS after any of
  them, as bench/e2e.py samples the service once it is ready (the process's lifetime peak is set
  earlier, by the conversion and compilation).

    .venv/bin/python bench/openvino_slices.py [--models efficientnet_lite0,resnet18]
        [--precisions bf16,fp32] [--rows 32,16,8,4] [--repeat 5]

Weights are `none` (speed and memory do not depend on them). Prints a table and writes
out/bench/openvino_slices.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.e2e import BATCH, NETWORKS, OUT  # noqa: E402  (the service's batch, the converted networks)
from catalog.embedder import Embedder  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.runtime import OpenVinoNetwork  # noqa: E402


def embedder(model: str, precision: str, rows: int) -> Embedder:
    e = Embedder(load_backbone(model, weights="none"), "cpu", execution="openvino", precision=precision,  # type: ignore[arg-type]
                 batch_size=BATCH, cache_dir=NETWORKS)
    assert isinstance(e._run, OpenVinoNetwork)
    e._run.rows = rows
    return e


def pixels(e: Embedder) -> torch.Tensor:
    width, height = e.input_size
    seeded = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (BATCH, 3, height, width), dtype=torch.uint8, generator=seeded)


def serving_rss_mb(model: str, precision: str, rows: int) -> float:
    """Run in a child process: the service's warm-up, then 10 full batches; the largest RSS after
    the warm-up and after each batch."""
    e = embedder(model, precision, rows)
    e.warm_up()
    me = psutil.Process()
    rss = me.memory_info().rss
    x = pixels(e)
    for _ in range(10):
        e.embed(x)
        rss = max(rss, me.memory_info().rss)
    return rss / 1e6


def rates(model: str, precision: str, rows: list[int], repeat: int, seconds: float) -> dict[int, list[float]]:
    e = embedder(model, precision, max(rows))
    x = pixels(e)
    network = e._run
    assert isinstance(network, OpenVinoNetwork)
    out: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(repeat):
        for r in rows:
            network.rows = r
            e.embed(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                e.embed(x)
                n += BATCH
            out[r].append(n / (time.perf_counter() - start))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet_lite0,resnet18")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--rows", default="32,16,8,4", help="slice sizes, the first being the reference")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.5, help="per slice size and round")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PRECISION", "ROWS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model, precision, rows = args.child
        print(json.dumps({"rss_mb": serving_rss_mb(model, precision, int(rows))}))
        return 0
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"batch {BATCH}, {torch.get_num_threads()} threads, {args.repeat} rounds of {args.seconds} s per slice size")
    print("| model | precision | rows per inference | img/s best | img/s median | median / first | RSS serving MB |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            measured = rates(model, precision, rows, args.repeat, args.seconds)
            for r in rows:
                child = subprocess.run([sys.executable, __file__, "--child", model, precision, str(r)], check=True,
                                       capture_output=True, text=True)
                rss = json.loads(child.stdout.strip().splitlines()[-1])["rss_mb"]
                median, first = statistics.median(measured[r]), statistics.median(measured[rows[0]])
                results.append({"model": model, "precision": precision, "rows": r, "img_s": measured[r],
                                "rss_mb": rss})
                print(f"| {model} | {precision} | {r} | {max(measured[r]):.1f} | {median:.1f} | {median / first:.2f} "
                      f"| {rss:.0f} |", flush=True)
    out = OUT / "openvino_slices.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
