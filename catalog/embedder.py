"""Images -> L2-normalised vectors on the chosen device.

Batches travel to the device as uint8 (a quarter of the bytes of float32); scaling to [0, 1],
mean/std normalisation, the backbone and the L2 normalisation all run there in one module.

Weights and activations use the channels-last memory layout on every device (faster convolutions
on CPUs and GPUs alike; the values are the same). On a GPU three things make the same network
several times faster (bench/gpu.py measures each):

- ``precision="bf16"``: autocast to bfloat16 (tensor cores); the output stays float32 and unit length;
- ``execution="cuda-graph"``: the whole forward pass is captured once for a fixed batch size and
  replayed, removing per-kernel launch cost; smaller batches are padded (rows are independent
  in eval mode, the padding rows are dropped);
- ``execution="compile"``: ``torch.compile`` (inductor kernels fused, CUDA graphs on a GPU),
  compiled and warmed up at start for the fixed batch size, padded like the above.

On a CPU, ``execution="openvino"`` runs the same network on OpenVINO (:mod:`catalog.runtime`),
converted once and kept on disk under ``cache_dir``; its ``precision="auto"`` is bf16 where the
CPU computes bf16 natively, the backbone's bf16 kept its verdicts (``LoadedBackbone.cpu_bf16``) and
bf16 measured faster than fp32 on this CPU (:func:`catalog.runtime.fastest_precision`: on some CPUs
with native bf16 it is slower), fp32 elsewhere (torch's own bf16 on a CPU measured several times
slower than its fp32, so eager stays fp32).

``auto`` picks bf16 + CUDA graphs on a GPU and OpenVINO on a CPU (compiling with torch on a small
CPU costs minutes of start-up for little gain).

A catalogue built at several input sizes (``catalog build --input-size 224,384``) runs the network
once per size and joins the vectors (:class:`_JoinedScales`); on a GPU it runs eagerly, at fp32
unless bf16 is asked for (neither is measured on a GPU yet), not as a CUDA graph.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from catalog.models import Fingerprint, LoadedBackbone
from catalog.preprocess import resized
from catalog.runtime import CpuPrecision, Network, OpenVinoNetwork, PrecisionChoice, fastest_precision, native_bf16

Precision = Literal["auto", "fp32", "bf16"]
Execution = Literal["auto", "eager", "cuda-graph", "compile", "openvino"]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def _power_of_two_chunks(pixels: torch.Tensor) -> list[torch.Tensor]:
    """Split a batch into chunks whose sizes are powers of two, largest first (25 -> 16, 8, 1).

    On the CPU every new batch shape leaves glibc's heap more fragmented: with partial batches of
    every size from 1 to 32, the process's resident memory grew by 1.1 GB over 1,000 batches and had
    not levelled off; with six shapes it stays flat (scripts/experiments/batch_shapes_rss.py). The
    cost falls on partial batches only: on 2 cores a chunk of 4 to 16 runs at 0.77-0.85x batch 32's
    rate per image for EfficientNet-Lite0 and 0.89-0.96x for ResNet-18 (bench/chunk_sizes.py); a
    full batch is one chunk.
    """
    n = pixels.shape[0]
    sizes = [1 << k for k in reversed(range(n.bit_length())) if n >> k & 1]  # the set bits of n
    return list(pixels.split(sizes)) if n else [pixels]


class _Normalised(nn.Module):
    def __init__(
        self, backbone: nn.Module, head: nn.Module | None, mean: tuple, std: tuple, autocast: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.autocast = autocast
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std)
        x = ((pixels.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            features = self.backbone(x)
        else:
            # cache_enabled=False: cached weight casts must not outlive a CUDA graph capture.
            with torch.autocast(x.device.type, dtype=self.autocast, cache_enabled=False):
                features = self.backbone(x)
        features = F.normalize(features.float(), dim=1)
        if self.head is not None:
            features = F.normalize(self.head(features), dim=1)
        return features


class _JoinedScales:
    """A catalogue's network at several input sizes (``Fingerprint.scales``): the batch arrives at
    the largest; each smaller size is resized from it as uint8 (antialiased bilinear, as Pillow
    resizes; torch's uint8 channels-last path, 0.2 ms a photo, where OpenVINO's own antialiased
    resize took 5 ms); each size runs its own network (scaling, mean/std, backbone, L2); the k unit
    vectors are joined and divided by sqrt(k), a unit vector again, then the head, if any."""

    def __init__(self, sizes: tuple[int, ...], networks: list[Network], head: nn.Module | None) -> None:
        self.sizes, self.networks, self.head = sizes, networks, head

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        views = [resized(pixels, (size, size)) for size in self.sizes[:-1]] + [pixels]  # the largest as decoded
        features = torch.cat([net(view) for net, view in zip(self.networks, views, strict=True)], dim=1)
        features = features / math.sqrt(len(views))
        return features if self.head is None else F.normalize(self.head(features), dim=1)


class Embedder:
    """Embeds uint8 image batches (N, 3, H, W) into unit vectors (N, dim)."""

    def __init__(
        self, backbone: LoadedBackbone, device: str | torch.device = "cpu", *, precision: Precision = "fp32",
        execution: Execution = "eager", batch_size: int = 32, cache_dir: Path | None = None,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        cuda = self.device.type == "cuda"
        if cuda:  # "cuda" -> "cuda:0", so tensors' devices compare equal
            self.device = torch.device("cuda", self.device.index or torch.cuda.current_device())
        self.execution = ("cuda-graph" if cuda else "openvino") if execution == "auto" else execution
        if self.execution == "cuda-graph" and not cuda:
            raise ValueError("execution 'cuda-graph' needs a CUDA device")
        if self.execution == "openvino" and cuda:
            raise ValueError("execution 'openvino' runs on the CPU; use device 'cpu' (or cuda-graph on the GPU)")
        if backbone.fingerprint.scales and self.execution in ("cuda-graph", "compile"):
            if execution != "auto":
                raise ValueError(f"execution {execution!r} does not run joined scales yet; use eager")
            self.execution = "eager"  # bf16 autocast still applies on a GPU
        openvino = self.execution == "openvino"
        if precision == "auto":
            # On a CPU, bf16 only where it is native and keeps the backbone's verdicts (cpu_bf16).
            # Joined sizes: bf16 is unmeasured on a GPU and moved verdicts on a CPU (LoadedBackbone.cpu_bf16).
            gpu_bf16 = cuda and not backbone.fingerprint.scales
            cpu_bf16 = openvino and backbone.cpu_bf16 and native_bf16()
            resolved: CpuPrecision = "bf16" if gpu_bf16 or cpu_bf16 else "fp32"
        else:
            resolved = precision
        # On a CPU where bf16 is a candidate, ``auto`` measures it against fp32 (below).
        self.precision_choice: PrecisionChoice | None = None
        self.precision = resolved
        self.batch_size = batch_size
        self.fingerprint: Fingerprint = backbone.fingerprint
        pre = self.fingerprint.preprocessing
        autocast = torch.bfloat16 if self.precision == "bf16" and not openvino else None
        scales = self.fingerprint.scales
        # With joined sizes the head follows the join (_JoinedScales), not one size's network.
        net = _Normalised(backbone.network, None if scales else backbone.head, pre.mean, pre.std, autocast)
        # Channels-last is the layout both oneDNN (CPU) and tensor cores (GPU) convolve fastest in
        # (measured in docs/performance.md).
        self._net = net.to(self.device).eval().to(memory_format=torch.channels_last)
        self._run: Network = self._net
        if openvino and not scales and precision == "auto" and resolved == "bf16":
            self._run, self.precision_choice = fastest_precision(
                net, self.fingerprint, threads=torch.get_num_threads(), batch_size=batch_size, cache_dir=cache_dir)
            self.precision = self.precision_choice.precision
        elif openvino and not scales:
            self._run = OpenVinoNetwork(net, self.fingerprint, precision=resolved,
                                        threads=torch.get_num_threads(), cache_dir=cache_dir)
        elif scales:
            head = None if backbone.head is None else backbone.head.to(self.device).eval()
            each = backbone.network_dim
            if head is not None and head.in_dim != each * len(scales):
                raise ValueError(f"a head on {head.in_dim} values does not fit {len(scales)} joined sizes "
                                 f"of {each} values")
            # One network per size, without the head: each is the network of a one-size catalogue
            # at that size (so OpenVINO's converted files are shared with those).
            networks: list[Network] = []
            for size in scales:
                alone = replace(self.fingerprint, preprocessing=replace(pre, size=(size, size)), dim=each, head=None,
                                scales=())
                networks.append(OpenVinoNetwork(net, alone, precision=resolved, threads=torch.get_num_threads(),
                                                cache_dir=cache_dir) if openvino else self._net)
            self._run = _JoinedScales(scales, networks, head)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None
        self._non_blocking = cuda
        self.warmup_s = 0.0
        self._warm = False

    @property
    def input_size(self) -> tuple[int, int]:
        return self.fingerprint.preprocessing.size

    def run_network(self, pixels: torch.Tensor) -> torch.Tensor:
        """The network alone on one chunk, exactly at its shape: no chunking, no padding (for
        benchmarks and experiments that measure a shape; :meth:`embed` is the service's path)."""
        return self._run(pixels)

    @property
    def _chunked(self) -> bool:
        """Batches split into power-of-two chunks: on a CPU (heap fragmentation), and for joined sizes
        on a GPU, which run eagerly, where each new shape would cost cuDNN's autotuning once more."""
        return self.device.type == "cpu" or bool(self.fingerprint.scales)

    @property
    def fixed_batch(self) -> bool:
        """Whether batches are padded to ``batch_size`` (graphs and compiled code are shape-specific)."""
        return self.execution in ("cuda-graph", "compile")

    def describe(self) -> str:
        said = f"{self.precision} {self.execution}" + (f" (batch {self.batch_size})" if self.fixed_batch else "")
        return said + (f" ({self.precision_choice.describe()})" if self.precision_choice else "")

    def warm_up(self) -> float:
        """Compile / capture / allocate for the configured batch size; returns the seconds it took.

        Call once at start, before the service reports ready, so the first photos do not pay it.
        """
        start = time.perf_counter()
        width, height = self.input_size
        example = torch.zeros((self.batch_size, 3, height, width), dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            if self.execution == "compile":
                mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on a GPU
                self._run = torch.compile(self._net, mode=mode, dynamic=False)
                for _ in range(3):  # compile, then let CUDA graph trees record and settle
                    self._run(example)
            elif self.execution == "cuda-graph":
                self._capture(example)
            elif self._chunked:  # every chunk size embed() will use for this batch size
                for k in reversed(range(self.batch_size.bit_length())):
                    self._run(example[:1 << k])
            else:
                self._run(example)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._warm = True
        self.warmup_s = time.perf_counter() - start
        return self.warmup_s

    def _capture(self, example: torch.Tensor) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # cuDNN picks its algorithms outside the capture
            for _ in range(3):
                self._net(example)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        static_in = example.clone()
        with torch.cuda.graph(graph):
            static_out = self._net(static_in)
        self._graph, self._static_in, self._static_out = graph, static_in, static_out

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit vectors for a uint8 batch; the result stays on the embedder's device."""
        if pixels.device.type == "cpu" and self._non_blocking:
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        elif pixels.device != self.device:
            pixels = pixels.to(self.device)
        run: Network
        if self.fixed_batch:
            if not self._warm:  # capturing now could collide with the decoder's work on the device
                raise RuntimeError(f"{self.execution} needs warm_up() before the first batch")
            run, parts = self._fixed, pixels.split(self.batch_size)
        elif self._chunked:
            run, parts = self._run, _power_of_two_chunks(pixels)
        else:
            return self._run(pixels)
        chunks = [run(part) for part in parts]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def _fixed(self, part: torch.Tensor) -> torch.Tensor:
        n = part.shape[0]
        if self._graph is not None:
            assert self._static_in is not None and self._static_out is not None  # captured together
            self._static_in[:n].copy_(part)
            self._graph.replay()
            return self._static_out[:n].clone()
        if n < self.batch_size:
            part = torch.cat([part, part.new_zeros((self.batch_size - n, *part.shape[1:]))])
        return self._run(part)[:n].clone()
