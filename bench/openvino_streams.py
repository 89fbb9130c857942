"""OpenVINO on a CPU: one stream over all the threads against one stream per thread, with the
cores to itself and beside a process that takes part of one core, in one run.

    .venv/bin/python bench/openvino_streams.py [--model efficientnet_lite0] [--batch 32] [--seconds 3] [--repeat 2]

- ``one stream``: OpenVINO's LATENCY hint over all the threads, a batch per synchronous call (the
  service's default, ``catalog.runtime.OpenVinoNetwork``);
- ``streams``: one stream per thread, unpinned, each batch split into contiguous slices started at
  once (``OpenVinoNetwork(..., streams=threads)``).

Beside each: nothing, then a second process that spins for part of every 10 ms (30%, 60%, 100%
of one core), standing in for what shares an edge box's cores with the network (the service's
decode threads, a broker). Both networks are the one the service caches for the catalogue's
fingerprint (weights ``none``: speed does not depend on them); precision ``auto``. Prints img/s
(the best of ``--repeat`` alternated runs) and the ratio.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog.embedder import Embedder  # noqa: E402
from catalog.models import load_backbone  # noqa: E402
from catalog.runtime import OpenVinoNetwork, native_bf16  # noqa: E402
from consumer.settings import available_cpus  # noqa: E402

SPIN = """
import time
busy, idle = {busy}, {idle}
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(idle)
"""


def rate(run: Callable[[], object], batch: int, seconds: float) -> float:
    run()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=2, help="alternated runs of each variant; the best is kept")
    args = parser.parse_args()
    import openvino as ov

    threads = available_cpus()
    torch.set_num_threads(threads)
    # The service's own conversion, cached by fingerprint: both variants compile the same model.
    embedder = Embedder(load_backbone(args.model, weights="none"), torch.device("cpu"), precision="auto",
                        execution="openvino", batch_size=args.batch, cache_dir=ROOT / ".cache" / "networks")
    one_stream_network = embedder._run
    assert isinstance(one_stream_network, OpenVinoNetwork), type(one_stream_network)
    precision = "bf16" if embedder.precision == "bf16" else "f32"
    streams = OpenVinoNetwork(embedder._net, embedder.fingerprint, precision=embedder.precision,  # type: ignore[arg-type]
                              threads=threads, streams=threads, cache_dir=ROOT / ".cache" / "networks")
    one = one_stream_network._compiled
    request = one.create_infer_request()  # the service's default: one synchronous call per batch
    x = torch.randint(0, 256, (args.batch, 3, *embedder.fingerprint.preprocessing.size[::-1]), dtype=torch.uint8)
    array = np.ascontiguousarray(x.numpy())

    def one_stream() -> None:
        request.infer({0: array}, share_inputs=True)

    def per_thread() -> None:
        streams(x)

    compiled = streams._compiled
    print(f"{args.model}, batch {args.batch}, {threads} threads, precision {precision} (native bf16: {native_bf16()}), "
          f"OpenVINO {ov.get_version()}; streams x threads as compiled: "
          f"{one.get_property('NUM_STREAMS')} x {one.get_property('INFERENCE_NUM_THREADS')} vs "
          f"{compiled.get_property('NUM_STREAMS')} x {compiled.get_property('INFERENCE_NUM_THREADS')}")
    print(f"{'beside the network':<32}{'one stream img/s':>18}{'streams img/s':>16}{'ratio':>8}")
    for duty in (0.0, 0.3, 0.6, 1.0):
        spinner = None
        if duty:
            spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(busy=0.01 * duty, idle=0.01 * (1 - duty))])
            time.sleep(0.3)
        try:  # alternated, best of --repeat each, so that a load change on a shared machine hits both
            a = b = 0.0
            for _ in range(args.repeat):
                a = max(a, rate(one_stream, args.batch, args.seconds))
                b = max(b, rate(per_thread, args.batch, args.seconds))
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
        label = "nothing" if not duty else f"a process busy {duty:.0%} of one core"
        print(f"{label:<32}{a:>18.1f}{b:>16.1f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()
