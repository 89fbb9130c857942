"""Every GPU measurement in one command (meant to finish in under 5 minutes on an H100/H200).

    python bench/gpu.py [--quick] [--device cuda]

1. model alone by backbone and precision: fp32, bf16 autocast + channels_last, and the latter
   compiled with torch.compile (mode max-autotune-no-cudagraphs is skipped for time);
2. catalogue match: 32 photos against 10k / 100k / 1M products, fp32 and fp16, top-5;
3. decode: Pillow (with draft, one process) vs nvJPEG (torchvision.io.decode_jpeg on CUDA,
   batch 32) on generated 1920x1080 shelf frames;
4. pipeline fed from memory (no broker): decode pool -> embed (ResNet-50) -> match, photos/s.

Writes out/bench/gpu.json with the card's name. `--device cpu --quick` exercises the code paths
on a machine without a GPU (numbers then mean nothing for the GPU targets).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import shelf_frames  # noqa: E402
from catalog.embedder import Embedder, resolve_device  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.preprocess import DecodeLimits, decode, to_tensor  # noqa: E402


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def models(device: torch.device, names: list[str], repeat: int, compile_: bool) -> list[dict]:
    rows = []
    x = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8, device=device)
    for name in names:
        backbone = load_backbone(name, weights="none").network.to(device).eval()
        xf = (x.float() / 255)
        modes = {"fp32": (backbone, xf, None)}
        if device.type == "cuda":
            cl = backbone.to(memory_format=torch.channels_last)
            modes["bf16_cl"] = (cl, xf.to(memory_format=torch.channels_last), torch.bfloat16)
            if compile_:
                modes["bf16_cl_compiled"] = (torch.compile(cl, mode="max-autotune"), modes["bf16_cl"][1], torch.bfloat16)
        for mode, (net, inp, dtype) in modes.items():
            def step(net=net, inp=inp, dtype=dtype):
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    net(inp)
            t0 = time.perf_counter()
            seconds = timed(step, device, repeat)
            rows.append({"model": name, "mode": mode, "ms_per_batch32": seconds * 1e3, "img_s": 32 / seconds,
                         "first_call_s": time.perf_counter() - t0 - seconds * repeat})
            print(f"{name:10s} {mode:18s} {seconds * 1e3:8.2f} ms/batch {32 / seconds:9.0f} img/s", flush=True)
    return rows


def matching(device: torch.device, sizes: list[int], repeat: int) -> list[dict]:
    rows = []
    q = torch.nn.functional.normalize(torch.randn(32, 2048, device=device), dim=1)
    for n in sizes:
        for dtype in (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,):
            refs = torch.nn.functional.normalize(torch.randn(n, 2048, device=device), dim=1).to(dtype)
            qd = q.to(dtype)
            seconds = timed(lambda: torch.topk(qd @ refs.T, 5, dim=1), device, repeat)
            rows.append({"catalog": n, "dtype": str(dtype).split(".")[-1], "ms_per_batch32": seconds * 1e3})
            print(f"match {n:>8d} {str(dtype):14s} {seconds * 1e3:8.3f} ms", flush=True)
            del refs
    return rows


def decoding(device: torch.device, frames: list[bytes], workers: int) -> dict:
    start = time.perf_counter()
    for f in frames:
        decode(f, (224, 224), DecodeLimits())
    pillow = len(frames) / (time.perf_counter() - start)
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(lambda f: decode(f, (224, 224), DecodeLimits()), frames * 4))
        pool_rate = len(frames) * 4 / (time.perf_counter() - start)
    result = {"pillow_draft_1thread_img_s": pillow, f"pillow_draft_{workers}threads_img_s": pool_rate}
    if device.type == "cuda":
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in (frames * 3)[:32]]
        seconds = timed(lambda: decode_jpeg(data, device=device), device, 5)
        result["nvjpeg_batch32_img_s"] = 32 / seconds
    print(json.dumps(result), flush=True)
    return result


def pipeline(device: torch.device, frames: list[bytes], workers: int, batches: int) -> dict:
    embedder = Embedder(load_backbone("resnet50", weights="none"), device)
    refs = torch.nn.functional.normalize(torch.randn(100_000, 2048, device=device), dim=1)
    if device.type == "cuda":
        refs = refs.half()
    inputs = (frames * (batches * 32 // len(frames) + 1))[: batches * 32]
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        futures = [pool.submit(lambda f: to_tensor(decode(f, (224, 224)).image), f) for f in inputs]
        for b in range(batches):
            pixels = torch.stack([fu.result() for fu in futures[b * 32 : (b + 1) * 32]])
            vectors = embedder.embed(pixels)
            torch.topk(vectors.to(refs.dtype) @ refs.T, 5, dim=1).indices.cpu()
        seconds = time.perf_counter() - start
    result = {"photos": len(inputs), "img_s": len(inputs) / seconds, "model": "resnet50", "catalog": 100_000}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=16)
    a = p.parse_args()
    device = resolve_device(a.device)
    quick = a.quick
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    frames = shelf_frames(4 if quick else 32)
    out = {
        "device": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "models": models(device, ["resnet18"] if quick else ["resnet18", "resnet50", "resnet101", "resnet152"],
                         2 if quick else 20, compile_=not quick),
        "match": matching(device, [1000] if quick else [10_000, 100_000, 1_000_000], 3 if quick else 50),
        "decode": decoding(device, frames, a.workers),
        "pipeline": pipeline(device, frames, a.workers, 2 if quick else 60),
    }
    dest = ROOT / "out" / "bench"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest / 'gpu.json'} ({card})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
