"""Every GPU measurement in one command (about 5 minutes on an H100/H200).

    python bench/gpu.py [--quick] [--device cuda] [--out out/bench/gpu.json]

All timings run the service's own classes (Embedder, Matcher, JpegBatchDecoder, and the
pipeline's stage functions), so what is measured is what ships:

1. model alone on pre-decoded uint8 batches of 32, per backbone: fp32 eager, bf16 eager
   (channels-last), bf16 CUDA graph (the service's default on a GPU), and for ResNet-50 also
   bf16 ``torch.compile`` (its compile time reported: the process's first, so a cold compile);
2. catalogue match: 32 photos against 10k / 100k / 1M products (fp16 on the device), top-5,
   the Matcher's full call and the matrix product + top-k alone;
3. decode of 1920x1080 shelf frames to 224x224: Pillow with draft on 1 and N threads, against
   the batched device decoder (nvJPEG), batch 32;
4. the pipeline fed from memory (no broker): header checks in the decode pool, batching, the
   device decode stage, embedding and matching (ResNet-50, 1M products), MatchEvent JSON for
   every photo: nvJPEG with the default CUDA graph and with torch.compile, and Pillow;
5. parity: ImageNet EfficientNet-Lite0 on the demo photos, the catalogue path (Pillow, fp32)
   against the service's GPU path (nvJPEG, bf16, CUDA graph): cosine of the embeddings and
   agreement of the top-1 product.

ResNet timings use untrained weights (throughput does not depend on the values; nothing is
downloaded). Results are written after each section, so a run cut short keeps what it measured.
``--device cpu --quick`` exercises the code paths on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import shelf_frames  # noqa: E402
from catalog.build import build_catalog, references_from_folder  # noqa: E402
from catalog.embedder import Embedder, resolve_device  # noqa: E402
from catalog.jpeg_batch import JpegBatchDecoder  # noqa: E402
from catalog.matcher import Matcher  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.preprocess import DecodeLimits, decode, probe_plain_jpeg  # noqa: E402
from catalog.store import Catalog  # noqa: E402

BATCH = 32
MODES = [("fp32", "eager"), ("bf16", "eager"), ("bf16", "cuda-graph")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Seconds per call, after one untimed call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def models(device: torch.device, names: list[str], repeat: int, modes: list[tuple[str, str]]) -> list[dict]:
    rows = []
    x = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8, device=device)
    for name in names:
        backbone = load_backbone(name, weights="none")
        for precision, execution in modes:
            embedder = Embedder(backbone, device, precision=precision, execution=execution, batch_size=BATCH)
            warm = embedder.warm_up()
            seconds = timed(lambda e=embedder: e.embed(x), device, repeat)
            rows.append({"model": name, "precision": precision, "execution": execution, "warmup_s": warm,
                         "ms_per_batch": seconds * 1e3, "img_s": BATCH / seconds})
            print(f"{name:10s} {precision:5s} {execution:10s} {seconds * 1e3:8.2f} ms/batch "
                  f"{BATCH / seconds:9.0f} img/s  (warm-up {warm:.1f}s)", flush=True)
            del embedder
    return rows


def random_catalog(n: int, dim: int, device: torch.device) -> Catalog:
    """A catalogue of ``n`` random unit vectors, one per product (built on the device: fast)."""
    gen = torch.Generator(device=device).manual_seed(n)
    vectors = F.normalize(torch.randn(n, dim, device=device, generator=gen), dim=1).cpu().numpy()
    backbone = load_backbone("resnet50", weights="none")
    return Catalog(embeddings=vectors, row_sku=np.arange(n, dtype=np.int32), skus=tuple(f"sku-{i}" for i in range(n)),
                   fingerprint=backbone.fingerprint, weights_source="none", references=())


def matching(device: torch.device, sizes: list[int], repeat: int) -> tuple[list[dict], Matcher]:
    rows = []
    q = F.normalize(torch.randn(BATCH, 2048, device=device), dim=1)
    matcher = None
    for n in sizes:
        del matcher
        matcher = Matcher(random_catalog(n, 2048, device), device=device, top_k=5)
        full = timed(lambda m=matcher: m.match(q), device, repeat)
        core = timed(lambda m=matcher: torch.topk(m.scores(q), 5, dim=1), device, repeat)
        rows.append({"catalog": n, "dtype": str(matcher.dtype).split(".")[-1], "ms_per_batch_full": full * 1e3,
                     "ms_per_batch_matmul_topk": core * 1e3})
        print(f"match {n:>9,d} products {rows[-1]['dtype']:8s} full {full * 1e3:7.3f} ms  matmul+top-k "
              f"{core * 1e3:7.3f} ms", flush=True)
    return rows, matcher


def decoding(device: torch.device, frames: list[bytes], workers: int, repeat: int) -> dict:
    size = (224, 224)
    one = lambda f: decode(f, size, DecodeLimits())  # noqa: E731
    start = time.perf_counter()
    for f in frames:
        one(f)
    result = {"frame": "1920x1080 JPEG", "frame_bytes": int(np.mean([len(f) for f in frames])),
              "pillow_draft_1_thread_img_s": len(frames) / (time.perf_counter() - start)}
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(one, frames * 4))
        result[f"pillow_draft_{workers}_threads_img_s"] = len(frames) * 4 / (time.perf_counter() - start)
    decoder = JpegBatchDecoder(device)
    batch = [probe_plain_jpeg(f) for f in (frames * (BATCH // len(frames) + 1))[:BATCH]]
    seconds = timed(lambda: decoder(batch, size), device, repeat)
    result["batched_device_decoder_img_s"] = BATCH / seconds
    result["batched_device_decoder"] = "nvJPEG" if device.type == "cuda" else "libjpeg (CPU)"
    print(json.dumps(result), flush=True)
    return result


async def _feed_pipeline(model, frames: list[bytes], photos: int, workers: int, device_jpeg: bool) -> float:
    """Photos/s through the service's stages from decode to MatchEvent, records from memory."""
    from aiokafka.structs import ConsumerRecord
    from prometheus_client import CollectorRegistry

    from consumer.batcher import batches
    from consumer.metrics import Metrics
    from consumer.pipeline import Topics, finish_decoding, process
    from consumer.source import Received, decode_record
    from consumer.stream import END, QUEUE_DEPTHS, EndOfStream

    loop = asyncio.get_running_loop()
    limits = DecodeLimits()
    size = model.embedder.input_size
    metrics = Metrics(CollectorRegistry())
    depths = (QUEUE_DEPTHS.fetched(BATCH), QUEUE_DEPTHS.batched, QUEUE_DEPTHS.ready, QUEUE_DEPTHS.processed)
    fetched, batched, ready, processed = (asyncio.Queue(maxsize=m) for m in depths)
    decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")
    device_pool = ThreadPoolExecutor(1, thread_name_prefix="device-decode")
    await loop.run_in_executor(model_pool, model.warm_up)

    async def feed() -> None:
        for i in range(photos):
            record = ConsumerRecord("bench", 0, i, int(time.time() * 1000), 0, b"k", frames[i % len(frames)], None,
                                    1, len(frames[i % len(frames)]), [("camera-id", b"c1")])
            future = loop.run_in_executor(decode_pool, decode_record, record, size, limits, device_jpeg)
            await fetched.put(Received(record=record, arrived=time.monotonic(), decoded=future))
        await fetched.put(END)

    async def drain() -> int:
        n = 0
        while not isinstance(outcome := await processed.get(), EndOfStream):
            n += sum(r.verdict is not None for r in outcome.records)
        return n

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        tg.create_task(batches(fetched, batched, max_size=BATCH, max_wait_s=0.05))
        tg.create_task(finish_decoding(batched, ready, recognizer=model, device_pool=device_pool, limits=limits,
                                       metrics=metrics))
        tg.create_task(process(ready, processed, recognizer=model, model_pool=model_pool,
                               topics=Topics("out", "dlq"), metrics=metrics, max_dead_letter_bytes=limits.max_bytes))
        events = tg.create_task(drain())
    seconds = time.perf_counter() - start
    for pool in (decode_pool, model_pool, device_pool):
        pool.shutdown()
    assert events.result() == photos, f"{events.result()} events for {photos} photos"
    return photos / seconds


def pipeline(device: torch.device, matcher: Matcher, frames: list[bytes], workers: int, photos: int) -> list[dict]:
    from consumer.pipeline import Recognizer

    backbone = load_backbone("resnet50", weights="none")
    rows = []
    variants = [("device", "auto"), ("pillow", "auto")]
    if device.type == "cuda":
        variants.insert(1, ("device", "compile"))
    for decoder, execution in variants:
        embedder = Embedder(backbone, device, precision="auto", execution=execution, batch_size=BATCH)
        jpeg = JpegBatchDecoder(device) if decoder == "device" else None
        model = Recognizer(embedder, matcher, random_catalog(1, 2048, device), jpeg)
        rate = asyncio.run(_feed_pipeline(model, frames, photos, workers, device_jpeg=jpeg is not None))
        rows.append({"model": "resnet50", "precision": embedder.precision, "execution": embedder.execution,
                     "jpeg_decoder": decoder, "catalog": len(matcher.skus), "photos": photos, "img_s": rate})
        print(json.dumps(rows[-1]), flush=True)
        del model, embedder
    return rows


def parity(device: torch.device, threshold: float = 0.70) -> dict:
    """The catalogue's path against the service's fast path, on real photos with real weights.

    Both run on the same device from separate copies of the network (the fast path converts its
    copy to channels-last). Verdicts use the demo's threshold; the score change is what could move
    a photo across it.
    """
    from tests import photos as P

    catalog = build_catalog(references_from_folder(P.REFERENCES), model="efficientnet_lite0", device=str(device),
                            progress=False)
    lite0 = load_backbone("efficientnet_lite0", weights="imagenet")
    slow = Embedder(lite0, device, precision="fp32", execution="eager")
    fast = Embedder(
        load_backbone("efficientnet_lite0", weights="imagenet"),
        device,
        precision="auto",
        execution="auto",
        batch_size=BATCH,
    )
    fast.warm_up()
    decoder = JpegBatchDecoder(device)
    matcher = Matcher(catalog, device=device, threshold=threshold)
    result = {}
    for kind, transform in (("store photos 348x348", lambda b: b), ("upscaled to 1920x1080", _to_frame)):
        truth, data = zip(*[(sku, transform(path.read_bytes())) for path, sku in P.store_photos()], strict=True)
        slow_px = torch.stack([decode(d, (224, 224)).pixels for d in data])
        fast_px = decoder([probe_plain_jpeg(d) for d in data], (224, 224))  # one batch, as in the service
        a = slow.embed(slow_px)
        b = fast.embed(torch.stack(fast_px))
        cos = F.cosine_similarity(a, b).cpu()
        ma, mb = matcher.match(a), matcher.match(b)
        result[kind] = {
            "photos": len(truth),
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "top1_agree": sum(x.best[0] == y.best[0] for x, y in zip(ma, mb, strict=True)) / len(truth),
            "verdict_agree": sum(x.verdict == y.verdict for x, y in zip(ma, mb, strict=True)) / len(truth),
            "threshold": threshold,
            "best_score_max_abs_change": max(abs(x.best[1] - y.best[1]) for x, y in zip(ma, mb, strict=True)),
            "top1_correct_catalogue_path": sum(x.best[0] == t for x, t in zip(ma, truth, strict=True)) / len(truth),
            "top1_correct_service_path": sum(y.best[0] == t for y, t in zip(mb, truth, strict=True)) / len(truth),
            "service_path": f"{'nvJPEG' if device.type == 'cuda' else 'libjpeg'} + {fast.describe()}",
        }
        print(kind, json.dumps(result[kind]), flush=True)
    return result


def _to_frame(data: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((1920, 1080), Image.Resampling.BICUBIC).save(
        buf, "JPEG", quality=90
    )
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the code paths, not the speed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "gpu.json")
    p.add_argument(
        "--skip", default="", help="comma-separated sections to skip: models,compile,match,decode,pipeline,parity"
    )
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    device = resolve_device(a.device)
    torch.backends.cudnn.benchmark = True
    quick = a.quick
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    out: dict = {
        "device": card,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit or "unknown",
        "cpus": os.cpu_count(),
        "batch": BATCH,
        "weights": "untrained ResNets for timing; ImageNet EfficientNet-Lite0 for parity",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save(key: str, value) -> None:
        out[key] = value
        a.out.write_text(json.dumps(out, indent=2) + "\n")

    started = time.perf_counter()
    frames = shelf_frames(4 if quick else 32)
    repeat = 2 if quick else 30
    if "models" not in skip:
        modes = [m for m in MODES if device.type == "cuda" or m[1] != "cuda-graph"]
        names = ["resnet18"] if quick else ["resnet18", "resnet50", "resnet101", "resnet152"]
        rows = models(device, names, repeat, modes)
        if "compile" not in skip and not quick and device.type == "cuda":
            # The process's first compile, on the main thread: its warm-up is a cold compile. (A
            # second compile of the same network after torch._dynamo.reset() failed in CUDA graph
            # trees' thread-local state on torch 2.11, so it is measured once, here.)
            rows += models(device, ["resnet50"], repeat, [("bf16", "compile")])
        save("models", rows)
    matcher = None
    if "match" not in skip:
        rows, matcher = matching(device, [1000] if quick else [10_000, 100_000, 1_000_000], 3 if quick else 50)
        save("match", rows)
    if "decode" not in skip:
        save("decode", decoding(device, frames, a.workers, 2 if quick else 10))
    if "pipeline" not in skip:
        matcher = matcher or Matcher(random_catalog(1000 if quick else 1_000_000, 2048, device), device=device)
        save("pipeline", pipeline(device, matcher, frames, a.workers, 64 if quick else 6400))
    del matcher
    if "parity" not in skip:
        save("parity", parity(device))
    save("seconds", time.perf_counter() - started)
    print(f"wrote {a.out} ({card}) in {out['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
