"""The catalogue watcher: a new file at ``SHELFMATCH_CATALOG`` swapped in between two batches,
without a restart, a rebalance or a lost photo.

One check, every ``SHELFMATCH_CATALOG_POLL_S`` seconds (a task in the service's TaskGroup):

1. **see**: the path is stat'ed, following symlinks; the resolved path, device, inode, size and
   modification time identify the file. An atomic rename over the path (a new inode) and a symlink
   flipped to another file (a Kubernetes ConfigMap or projected volume update) both change it. A
   rewrite in place changes size or mtime. Nothing changed: nothing else happens.
2. **load**, on the catalogue thread (never the event loop): :meth:`Catalog.load` checks the format
   and the content hash, so a corrupt or half-written file is refused as ``invalid``; a file that
   changed again while it was read is left for the next poll.
3. **check** (:func:`judge`): the same version and calibration as the serving one: ``unchanged``;
   another model fingerprint: ``other_model`` (the service would need other weights); on CUDA, a
   matrix that would not fit beside the serving one: ``no_memory``.
4. **upload**, still on the catalogue thread: a :class:`Matcher` for the new catalogue is built on
   the device (on its own CUDA stream) and warmed up, while the old one keeps serving.
5. **swap**, on the event loop: ``recognizer.serving`` is replaced. The process stage reads it once
   per batch, so the batch being matched finishes on the old catalogue and the next one uses the
   new. The old matrix is freed once no batch holds it.

Whatever a check finds, the serving catalogue stays unless a valid one of the same model replaces
it; each result is counted (``shelfmatch_catalog_swaps_total{result}``) and logged. Delay from a
file landing to its first batch: up to one poll, plus load and upload (``shelfmatch_catalog_swap_seconds``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from catalog.errors import CatalogError
from catalog.matcher import Matcher, device_bytes
from catalog.store import Catalog
from consumer.errors import ConfigurationError
from consumer.metrics import Metrics
from consumer.pipeline import Recognizer, Serving

log = logging.getLogger(__name__)

# Device memory left free after an upload, for the allocator's fragmentation and the model's batches.
DEVICE_HEADROOM_BYTES = 256 * 1024 * 1024


class SwapResult(StrEnum):
    SWAPPED = "swapped"
    UNCHANGED = "unchanged"  # same version and calibration as the serving one
    INVALID = "invalid"  # unreadable, not a catalogue, corrupt or half-written
    MISSING = "missing"  # nothing at the path (removed, dangling symlink)
    OTHER_MODEL = "other_model"  # refused: another model fingerprint
    NO_MEMORY = "no_memory"  # refused: would not fit on the device beside the serving one
    UNCALIBRATED = "uncalibrated"  # refused: no calibration, and no SHELFMATCH_THRESHOLD
    FAILED = "failed"  # anything else went wrong while uploading


@dataclass(frozen=True)
class FileIdentity:
    """What tells one catalogue file from the next at the same path."""

    path: str  # with symlinks resolved
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        """The file now at ``path``; None when there is none (removed, dangling symlink)."""
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except OSError:
            return None
        return cls(path=real, device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


def operating_point(
    catalog: Catalog, threshold: float | None, min_margin: float | None, path: object = "the catalogue",
) -> tuple[float, float]:
    """Threshold and min margin: as configured, else the catalogue's calibration. There is no
    default threshold: an uncalibrated catalogue without SHELFMATCH_THRESHOLD is refused (a guess
    made almost every EfficientNet-Lite0 event 'unknown'), with what to do."""
    calibration = catalog.calibration
    if threshold is None:
        if calibration is None:
            raise ConfigurationError(
                f"catalogue {path} is not calibrated, so no threshold for 'match' is known: run "
                f"`shelfmatch catalog calibrate --catalog {path} --queries DIR` on labelled photos "
                "(DIR/<sku>/<image>), or set SHELFMATCH_THRESHOLD"
            )
        threshold = calibration.threshold
    if min_margin is None:
        min_margin = calibration.min_margin if calibration else 0.0
    return threshold, min_margin


def judge(serving: Serving, new: Catalog, *, free_bytes: int | None, needed_bytes: int) -> SwapResult | None:
    """Whether ``new`` may replace ``serving``: None if it may, else why not. ``free_bytes`` is the
    device memory available (None on a CPU: not checked), ``needed_bytes`` what the new matcher takes."""
    if new.fingerprint != serving.fingerprint:
        return SwapResult.OTHER_MODEL
    if new.version == serving.ref.version and new.calibration == serving.calibration:
        return SwapResult.UNCHANGED
    if free_bytes is not None and needed_bytes + DEVICE_HEADROOM_BYTES > free_bytes:
        return SwapResult.NO_MEMORY
    return None


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a new matrix could take on ``device``: what the driver has free plus what torch's
    caching allocator holds unused. None on a CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class CatalogWatcher:
    """Polls the catalogue file and swaps a valid new version in (see the module docstring)."""

    def __init__(
        self, path: Path, recognizer: Recognizer, *, pool: Executor, metrics: Metrics, poll_s: float, top_k: int,
        threshold: float | None, min_margin: float | None, seen: FileIdentity | None,
    ) -> None:
        self.path = path
        self.recognizer = recognizer
        self.pool = pool
        self.metrics = metrics
        self.poll_s = poll_s
        self.top_k = top_k
        self.threshold = threshold
        self.min_margin = min_margin
        self._seen: FileIdentity | None | object = seen  # object(): look again at the next poll

    async def run(self) -> None:
        """Check every ``poll_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.poll_s)
            await self.check()

    async def check(self) -> SwapResult | None:
        """One poll: None when the file did not change (or changed while it was read), else what
        was done about it."""
        identity = FileIdentity.of(self.path)
        if identity == self._seen:
            return None
        self._seen = identity
        started = time.monotonic()
        serving = self.recognizer.serving
        result = await self._try_swap(identity, serving)
        if result is None:
            self._seen = object()
            return None
        self.metrics.catalog_swaps.labels(result.value).inc()
        if result is SwapResult.SWAPPED:
            self.metrics.catalog_swap_seconds.observe(time.monotonic() - started)
        return result

    async def _try_swap(self, identity: FileIdentity | None, serving: Serving) -> SwapResult | None:
        keeps = f"keeping catalogue {serving.ref.version} ({serving.products} products)"
        if identity is None:
            log.warning("catalogue file %s is gone; %s", self.path, keeps)
            return SwapResult.MISSING
        loop = asyncio.get_running_loop()
        try:
            catalog = await loop.run_in_executor(self.pool, Catalog.load, self.path)
        except CatalogError as exc:
            log.error("catalogue file %s changed but cannot be used (%s); %s", self.path, exc, keeps)
            return SwapResult.INVALID
        except Exception:  # whatever a file can do to the reader, the serving catalogue stays
            log.exception("catalogue file %s changed but reading it failed; %s", self.path, keeps)
            return SwapResult.INVALID
        if FileIdentity.of(self.path) != identity:
            log.info("catalogue file %s changed while it was read; reading it again at the next poll", self.path)
            return None
        device = serving.matcher.device
        batch = self.recognizer.embedder.batch_size
        needed = device_bytes(len(catalog.row_sku), catalog.fingerprint.dim, device, batch)
        try:
            free = await loop.run_in_executor(self.pool, free_device_bytes, device)
            refused = judge(serving, catalog, free_bytes=free, needed_bytes=needed)
            if refused is SwapResult.UNCHANGED:
                log.info("catalogue file %s replaced by the same version %s; nothing to swap", self.path,
                         catalog.version)
                return refused
            if refused is SwapResult.OTHER_MODEL:
                log.error("catalogue %s at %s was built with %s, but this service runs %s: refused, %s "
                          "(a new model needs a new deployment)", catalog.version, self.path,
                          catalog.fingerprint.describe(), serving.fingerprint.describe(), keeps)
                return refused
            if refused is SwapResult.NO_MEMORY:
                log.error("catalogue %s needs %.2f GB on %s beside the serving one, %.2f GB are free: refused, %s",
                          catalog.version, needed / 1e9, device, (free or 0) / 1e9, keeps)
                return refused
            if self.threshold is None and catalog.calibration is None:
                log.error("catalogue %s at %s is not calibrated and SHELFMATCH_THRESHOLD is not set: refused, %s "
                          "(run `shelfmatch catalog calibrate` on it)", catalog.version, self.path, keeps)
                return SwapResult.UNCALIBRATED
            matcher = await loop.run_in_executor(self.pool, self._upload, catalog, device, batch)
        except torch.cuda.OutOfMemoryError:
            log.error("catalogue %s did not fit on %s: refused, %s", catalog.version, device, keeps)
            return SwapResult.NO_MEMORY
        except Exception:  # recorded (log, metric); the old catalogue serves on by design
            log.exception("catalogue %s could not be put on %s; %s", catalog.version, device, keeps)
            return SwapResult.FAILED
        self.recognizer.serving = new = Serving.of(catalog, matcher)
        self.metrics.catalog_serving(version=new.ref.version, model=new.ref.model, products=new.products,
                                     references=new.references, device_bytes=matcher.device_bytes)
        log.info("catalogue swapped: %s (%d products, %d references) -> %s (%d products, %d references), "
                 "threshold %.3f, min margin %.3f", serving.ref.version, serving.products, serving.references,
                 new.ref.version, new.products, new.references, matcher.threshold, matcher.min_margin)
        return SwapResult.SWAPPED

    def _upload(self, catalog: Catalog, device: torch.device, batch_size: int) -> Matcher:
        """The new catalogue's matcher on ``device``, warmed up (catalogue thread). On CUDA the copy
        and the warm-up run on a stream of their own, beside the batches on the model's stream."""
        threshold, min_margin = operating_point(catalog, self.threshold, self.min_margin)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            matcher = Matcher(catalog, device=device, top_k=self.top_k, threshold=threshold, min_margin=min_margin)
            # On CUDA a batch is matched once, so that cuBLAS and top-k are set up for its shape
            # before a photo needs them. A CPU has nothing to set up: a warm-up would only take the
            # model's cores and memory bandwidth (a pass over the whole matrix) beside the photos.
            if stream is not None:
                matcher.match(torch.zeros((batch_size, catalog.fingerprint.dim)))
        if stream is not None:
            stream.synchronize()
        return matcher

