"""Runtimes that execute the catalogue's network: torch's own, and OpenVINO on a CPU.

Both take what :class:`catalog.embedder.Embedder` hands them, a uint8 batch (N, 3, H, W) on the
CPU, and return float32 unit vectors (N, dim): the scaling, the mean/std normalisation, the
backbone, the L2 normalisation and the head are all inside the one network that runs.

OpenVINO is the CPU runtime (measured against torch and onnxruntime on the same cores,
docs/performance.md): its CPU plugin fuses the whole network into oneDNN primitives and, on a
CPU with native bf16 (AVX512_BF16, AMX), can run it in bfloat16. Whether that is faster depends on
the CPU: 1.7-2.0x its own fp32 rate on an AMD EPYC with AVX512_BF16, 0.65-0.72x at the default slices on an
Intel Xeon that has AVX512_BF16 without AMX (both measured, docs/performance.md), so :func:`fastest_precision` times
both on the CPU it runs on and keeps the answer beside the converted network. The torch
module is converted once (``openvino.convert_model`` traces it directly, no ONNX file) and the
result is kept on disk, keyed by the catalogue's fingerprint and the OpenVINO version, so later
starts read it instead of converting again. The fingerprint check is not loosened by this: the
torch network is built and checked against the catalogue before anything is converted or read.
A catalogue at joined input sizes converts one network per size, without its head, which then
runs in torch after the join (catalog.embedder._JoinedScales).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from catalog.models import Fingerprint

log = logging.getLogger(__name__)

CpuPrecision = Literal["fp32", "bf16"]

# Photos per inference and thread (OpenVinoNetwork.rows): on 2 threads, slices of 8 ran 1.03-1.21x
# as fast as slices of 32 and kept 58-228 MB less memory; 4 gained little more (bench/openvino_slices.py).
ROWS_PER_THREAD = 4

# ``auto`` takes bf16 only where it measured at least this much faster than fp32 on this CPU: its
# vectors differ slightly from torch's (parity, tests/unit/test_runtime.py), fp32's do not, and a
# start-up measurement on a busy node has some noise. Measured: 1.7-2.0x (AMD EPYC), 0.65-0.72x (an Intel
# Xeon without AMX, at the default slices), so the margin decides nothing on either.
BF16_MIN_SPEEDUP = 1.1
_clock = time.perf_counter  # what fastest_precision times with (a test gives it a clock of its own)


class Network(Protocol):
    """A network ready to run: uint8 pixels (N, 3, H, W) in, float32 unit vectors (N, dim) out."""

    def __call__(self, pixels: torch.Tensor, /) -> torch.Tensor: ...


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512_BF16 or AMX), as OpenVINO's CPU plugin
    reports it; without it bf16 would be emulated, slower than fp32."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_identity() -> str:
    """A short hash of what a speed measured on this CPU depends on: its model name and its flags
    (what oneDNN picks its kernels by; a hypervisor that hides AMX changes the flags)."""
    text = f"{platform.machine()} {platform.processor()}"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")  # x86, then arm64's names
        text += "\n" + "\n".join(next((ln for ln in lines if ln.startswith(name)), "") for name in wanted)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_key(fingerprint: Fingerprint, network: nn.Module) -> str:
    """What a converted network depends on: everything in the fingerprint, the code of the module
    converted (the wrapper around the backbone: scaling, mean/std, head, L2), and the versions of
    torch (which traces it) and of the converter."""
    import openvino as ov

    code = hashlib.sha256(inspect.getsource(type(network)).encode()).hexdigest()
    text = json.dumps({"fingerprint": fingerprint.to_dict(), "openvino": ov.get_version(), "torch": torch.__version__,
                       "code": code}, sort_keys=True)
    return f"{fingerprint.backbone}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


class OpenVinoNetwork:
    """The catalogue's network compiled by OpenVINO for this CPU, at ``precision``, on ``threads``
    threads: by default one stream over all of them (OpenVINO's LATENCY hint), one batch per call;
    with ``streams`` > 1, that many streams sharing the threads, unpinned, each batch split into
    contiguous slices, one per stream, started at once.

    The one stream makes each layer a parallel loop whose threads meet at a barrier, so anything
    that takes a core for a moment stalls every thread; streams meet once per batch and measured
    1.14-1.30x beside a process spinning on one core, as fast alone (bench/openvino_streams.py). They
    stay off by default because beside the catalogue thread, which loads a new catalogue at
    SCHED_IDLE, they made batches slower and starved the load (bench/catalog_load.py;
    docs/performance.md, *OpenVINO streams*). OpenVINO may give fewer streams than asked; the batch
    is split into as many as it gave.

    A batch goes through in slices of at most ``rows`` photos, one after the other: by default
    :data:`ROWS_PER_THREAD` per thread with one stream, the whole batch with several. An inference
    request keeps buffers for the largest batch it has run, so the slice, not the service's batch,
    sets the network's working memory; the smaller activations also stay in cache
    (docs/performance.md, *OpenVINO slices*)."""

    def __init__(
        self, network: nn.Module, fingerprint: Fingerprint, *, precision: CpuPrecision, threads: int,
        cache_dir: Path | None = None, streams: int = 1, rows: int | None = None,
    ) -> None:
        import openvino as ov

        if rows is not None and rows < 1:
            raise ValueError(f"rows must be at least 1, not {rows}")
        # Streams split a whole batch between them by default, as bench/openvino_streams.py measured them.
        self.rows = rows or (ROWS_PER_THREAD * max(1, threads) if streams == 1 else sys.maxsize)

        if precision == "bf16" and not native_bf16():
            raise ValueError("precision 'bf16' on this CPU would be emulated (no AVX512_BF16 or AMX); use fp32")
        self.precision = precision
        self.converted_now = False
        key = cache_key(fingerprint, network)
        # Precision is a compile-time choice: OpenVINO's default on a bf16 CPU is bf16, so fp32 is
        # asked for explicitly. One stream (LATENCY) unless more are asked for (see the class's docstring).
        config: dict = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                        "INFERENCE_NUM_THREADS": threads}
        if streams > 1:
            config |= {"NUM_STREAMS": streams, "ENABLE_CPU_PINNING": False}
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        model = self._read(cache_dir, key) if cache_dir is not None else None
        compiled = None
        if model is not None:
            try:
                compiled = ov.Core().compile_model(model, "CPU", config)
            except RuntimeError as exc:  # e.g. weights cut short beside a readable .xml: convert again
                log.warning("converted network %s in %s does not compile (%s); converting again", key, cache_dir, exc)
        if compiled is None:
            model = self._convert(network, fingerprint)
            self.converted_now = True
            if cache_dir is not None:
                self._write(model, cache_dir, key)
            compiled = ov.Core().compile_model(model, "CPU", config)
        self._compiled = compiled
        # What OpenVINO gave, which can be fewer than asked (e.g. hyper-thread siblings are not counted).
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self._requests = [compiled.create_infer_request() for _ in range(self.streams)]
        log.debug("OpenVINO: %d streams over %s threads", self.streams, compiled.get_property("INFERENCE_NUM_THREADS"))

    @staticmethod
    def _convert(network: nn.Module, fingerprint: Fingerprint) -> object:
        import openvino as ov

        width, height = fingerprint.preprocessing.size
        example = torch.zeros((2, 3, height, width), dtype=torch.uint8)
        with torch.no_grad():
            model = ov.convert_model(network, example_input=example)
        model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, height, width])})  # any batch size
        return model

    @staticmethod
    def _read(cache_dir: Path, key: str) -> object | None:
        import openvino as ov

        xml = cache_dir / f"{key}.xml"
        if not xml.is_file():
            return None
        try:
            return ov.Core().read_model(str(xml))
        except RuntimeError as exc:  # a truncated or foreign file: convert again and replace it
            log.warning("converted network %s is unreadable (%s); converting again", xml, exc)
            return None

    @staticmethod
    def _write(model: object, cache_dir: Path, key: str) -> None:
        """Save next to the final name, then rename (weights first), so a reader never sees half a
        file. The temporary name is unique per writer: pods sharing a cache volume are all PID 1."""
        import openvino as ov

        tmp = cache_dir / f".{key}.{uuid.uuid4().hex}.xml"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            ov.save_model(model, str(tmp), compress_to_fp16=False)  # the weights stay exactly fp32
            os.replace(tmp.with_suffix(".bin"), cache_dir / f"{key}.bin")
            os.replace(tmp, cache_dir / f"{key}.xml")
        except (OSError, RuntimeError) as exc:  # an unwritable or full disk costs each start a conversion, no more
            log.warning("could not keep the converted network in %s (%s); it is converted at every start",
                        cache_dir, exc)
        finally:
            for leftover in (tmp, tmp.with_suffix(".bin")):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vectors for ``pixels``, a slice of at most :attr:`rows` photos at a time (rows are
        independent)."""
        # share_inputs (below): OpenVINO reads the array's memory in place, and a slice of whole
        # rows of a C-contiguous array is contiguous too.
        array = np.ascontiguousarray(pixels.numpy())
        if len(array) <= self.rows:
            return torch.from_numpy(self._infer(array))
        return torch.from_numpy(np.concatenate([self._infer(array[i:i + self.rows])
                                                for i in range(0, len(array), self.rows)]))

    def _infer(self, array: np.ndarray) -> np.ndarray:
        """One slice: contiguous parts of its rows, as even as possible, one per stream (fewer for a
        slice smaller than the streams), inferred at once. The outputs are copied out of the
        requests' buffers, which the next inference overwrites."""
        parts = np.array_split(array, min(self.streams, len(array))) if len(array) else [array]
        started: list = []
        failed: list[RuntimeError] = []
        try:
            for request, part in zip(self._requests, parts, strict=False):  # parts <= streams
                request.start_async({0: part}, share_inputs=True)
                started.append(request)
        finally:  # none may still read the input's memory, or be busy at the next call, once this returns
            for request in started:
                try:
                    request.wait()
                except RuntimeError as exc:
                    failed.append(exc)
        if failed:
            raise failed[0]
        outputs = [request.get_output_tensor(0).data for request in started]
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0].copy()


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` chose on this CPU, and the rates it chose by (img/s of a full batch)."""

    precision: CpuPrecision
    img_s: dict[str, float]
    measured_now: bool  # False: read from the record a previous start left in the network cache

    def describe(self) -> str:
        rates = ", ".join(f"{p} {self.img_s[p]:.0f}" for p in ("bf16", "fp32") if p in self.img_s)
        return f"auto: {rates} img/s{'' if self.measured_now else ' when first measured'}"


def fastest_precision(
    network: nn.Module, fingerprint: Fingerprint, *, threads: int, batch_size: int, cache_dir: Path | None = None,
) -> tuple[OpenVinoNetwork, PrecisionChoice]:
    """The network compiled at bf16 or fp32, whichever runs faster here (bf16 only by at least
    :data:`BF16_MIN_SPEEDUP`), for a CPU with native bf16 and a backbone whose bf16 keeps its verdicts.

    The first start on a CPU compiles both and times a full batch of each, alternately, best of
    three after one untimed run (on 2 cores: a few seconds for EfficientNet-Lite0, more for a
    ResNet), holding both compiled networks meanwhile; the choice is kept in ``cache_dir`` per
    converted network, CPU (:func:`cpu_identity`), thread count and batch size, so later starts
    compile only the one chosen. A record that is unreadable is measured again; deleting it
    (``*.precision.json``) measures again at the next start."""
    record = None
    if cache_dir is not None:
        name = f"{cache_key(fingerprint, network)}.{cpu_identity()}-{threads}t-{batch_size}b.precision.json"
        record = cache_dir / name
    known = _read_choice(record) if record is not None else None
    if known is not None:
        return OpenVinoNetwork(network, fingerprint, precision=known.precision, threads=threads,
                               cache_dir=cache_dir), known
    width, height = fingerprint.preprocessing.size
    sample = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    candidates = {p: OpenVinoNetwork(network, fingerprint, precision=p, threads=threads, cache_dir=cache_dir)
                  for p in ("bf16", "fp32")}
    best = dict.fromkeys(candidates, float("inf"))
    for net in candidates.values():
        net(sample)  # the first inference allocates
    for _ in range(3):
        for precision, net in candidates.items():
            start = _clock()
            net(sample)
            best[precision] = min(best[precision], _clock() - start)
    img_s = {p: batch_size / seconds for p, seconds in best.items()}
    chosen = faster(img_s)
    log.info("OpenVINO on this CPU at batch %d: bf16 %.0f img/s, fp32 %.0f img/s: %s", batch_size,
             img_s["bf16"], img_s["fp32"], chosen)
    if record is not None:
        _write_choice(record, chosen, img_s)
    return candidates[chosen], PrecisionChoice(chosen, img_s, measured_now=True)


def faster(img_s: dict[str, float]) -> CpuPrecision:
    """bf16 if it ran at least :data:`BF16_MIN_SPEEDUP` times fp32's rate, else fp32."""
    return "bf16" if img_s["bf16"] >= BF16_MIN_SPEEDUP * img_s["fp32"] else "fp32"


def _read_choice(record: Path) -> PrecisionChoice | None:
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        precision, img_s = data["precision"], {str(p): float(r) for p, r in data["img_s"].items()}
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision {precision!r} is neither bf16 nor fp32")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("precision record %s is unreadable (%s); measuring again", record, exc)
        return None
    return PrecisionChoice(precision, img_s, measured_now=False)


def _write_choice(record: Path, precision: CpuPrecision, img_s: dict[str, float]) -> None:
    tmp = record.with_name(f".{record.name}.{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps({"precision": precision, "img_s": img_s,
                                   "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        os.replace(tmp, record)
    except OSError as exc:  # as for the network itself: measured again at the next start, no more
        log.warning("could not keep the precision measured in %s (%s)", record.parent, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
