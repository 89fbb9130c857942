"""Experiment behind issue #15's notes: where the real service's CPU goes, thread by thread.

Starts the local broker, puts a backlog of the demo store photos on a topic, starts the service
(``consumer.cli consume``, as bench/e2e.py does) and, while it drains the backlog, reads each of
its threads' CPU time from /proc (the service names its worker threads: ``decode_N``, ``model_0``,
``catalog_0``; threads that OpenVINO or OpenMP start keep the name of the thread that started
them, so those started from the main thread, where OpenVINO compiles the network, are counted
together as "unnamed"). Prints each group's cores and core-ms per photo over the events' window,
the broker's cores, and the network alone before it (bench/e2e.py's ModelAlone on torch's threads,
no decode; its core-ms per photo counts every thread busy all the time, an upper bound) for
comparison. Weights ``none``: speed does not depend on them. Not run by the tests (about 1 minute).

    .venv/bin/python scripts/experiments/service_threads.py [MODEL] [EXECUTION[:PRECISION]] [PHOTOS]
    (defaults: efficientnet_lite0 openvino 1280)
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import e2e  # noqa: E402


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread's name and CPU seconds (user + system)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / tick)
    return out


def main(argv: list[str]) -> None:
    model = argv[0] if argv else "efficientnet_lite0"
    spec = argv[1] if len(argv) > 1 else "openvino"
    n = int(argv[2]) if len(argv) > 2 else 1280
    execution, _, precision = spec.partition(":")
    precision = precision or "auto"
    bootstrap = e2e.start_broker()
    broker = psutil.Process(e2e.BROKER_PID)
    try:
        photos = e2e.store_photos()
        alone = e2e.ModelAlone(model, photos, execution, precision)
        alone_img_s = alone.rate()
        del alone
        catalog = e2e.demo_catalog(model)
        run = os.urandom(3).hex()
        topic, out = f"threads.in.{run}", f"threads.out.{run}"
        asyncio.run(e2e.create(bootstrap, topic, out, out + ".dlq"))
        asyncio.run(e2e.send(bootstrap, topic, photos, n))
        samples: list[tuple[float, dict[int, tuple[str, float]], float]] = []
        done = threading.Event()
        service = e2e.Service(bootstrap, catalog, topic, out, f"g-{run}", execution, precision)

        def sample() -> None:
            while not done.is_set():
                try:
                    cpu = broker.cpu_times()
                    samples.append((time.time(), thread_cpu(service.proc.pid), cpu.user + cpu.system))
                except (OSError, psutil.Error):  # the service or the broker has gone: the window is over
                    return
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            records = asyncio.run(e2e.collect(bootstrap, out, n))
        finally:
            done.set()
            sampler.join()
            service.stop()
    finally:
        e2e.stop_broker()
    first, last = e2e.event_window(records)
    (t0, before, b0), (t1, after, b1) = (min(samples, key=lambda s: abs(s[0] - t)) for t in (first, last))
    # rate_of's window: the events after the first batch's, over the time from its last to the last
    wall, photos_in_window = t1 - t0, (n - e2e.BATCH) * (t1 - t0) / (last - first)
    groups: dict[str, float] = {}
    main_name = after[service.proc.pid][0]
    for tid, (name, cpu) in after.items():
        if tid == service.proc.pid:
            group = "event loop (main thread)"
        elif name == main_name:  # started by the main thread: OpenVINO compiles the network there
            group = "unnamed (OpenVINO's threads)"
        else:
            group = re.sub(r"_\d+$", "", name)
        groups[group] = groups.get(group, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    threads = torch.get_num_threads()
    print(f"{model} {spec}: service {e2e.rate_of(records):.1f} img/s; network alone {alone_img_s:.1f} img/s on "
          f"{threads} threads ({threads * 1e3 / alone_img_s:.2f} core-ms per photo); window {wall:.1f} s")
    print(f"{'threads':<28}{'cores':>8}{'core-ms/photo':>16}")
    for group, cpu in sorted(groups.items(), key=lambda kv: -kv[1]):
        if cpu > 0.005 * wall:
            print(f"{group:<28}{cpu / wall:>8.2f}{cpu * 1e3 / photos_in_window:>16.2f}")
    total = sum(groups.values())
    print(f"{'service, all threads':<28}{total / wall:>8.2f}{total * 1e3 / photos_in_window:>16.2f}")
    print(f"{'broker':<28}{(b1 - b0) / wall:>8.2f}{(b1 - b0) * 1e3 / photos_in_window:>16.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
