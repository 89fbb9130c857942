"""Readiness and liveness as the service itself sees them, for /readyz, /healthz, and the
``shelfmatch_ready`` and ``shelfmatch_pipeline_stalled`` gauges. Written by the stages on the
event loop, read by the HTTP thread.

What ready means, and why each part:

- ``consuming``: subscribed and not stopping;
- ``joined``: the group coordinator has answered this member's join with an assignment, *even an
  empty one*. A member with no partitions (a group with more members than input partitions) is
  not broken: it is a hot spare that takes partitions over in the next rebalance, and a rollout
  must be able to pass it. Before the first assignment the member does nothing, so it is not ready.
  A later rebalance does not drop readiness (every member would blink NotReady at once);
- ``input_found``: the consumer's metadata knows the input topic (a misspelt one is not ready);
- ``output_found``: the output and dead-letter topics are in the producer side's metadata with
  their partitions (:class:`OutputProbe`). This is what "can publish" honestly means before the
  first event: an idle input topic would otherwise never make a pod ready. It cannot prove the
  write ACL (only a write does, and a probe record would be a fake event); that is left to
- ``publishing`` is the result of the last publish attempt: ``None`` before the first, ``False``
  from a failed or unacknowledged attempt until a batch is acknowledged again. A missing write
  ACL shows with the first photo.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator

from prometheus_client import Gauge


class Health:
    """What /readyz answers (:attr:`ready`, see the module docstring), and ``last_tick``, the
    event loop's last proof of life for /healthz."""

    def __init__(self, ready_gauge: Gauge | None = None) -> None:
        self.consuming = False
        self.joined = False  # an assignment (maybe empty) came from the group coordinator
        self.input_found = True  # the broker's metadata knows the input topic
        self.output_found = True  # the output and dead-letter topics are known to the producer side
        self.publishing: bool | None = None  # the last publish attempt: None before the first
        self.last_tick = time.monotonic()
        self._gauge = ready_gauge

    @property
    def ready(self) -> bool:
        return (self.consuming and self.joined and self.input_found and self.output_found
                and self.publishing is not False)

    def set(
        self, *, consuming: bool | None = None, publishing: bool | None = None, input_found: bool | None = None,
        joined: bool | None = None, output_found: bool | None = None,
    ) -> None:
        if consuming is not None:
            self.consuming = consuming
        if joined is not None:
            self.joined = joined
        if input_found is not None:
            self.input_found = input_found
        if output_found is not None:
            self.output_found = output_found
        if publishing is not None:
            self.publishing = publishing
        if self._gauge is not None:
            self._gauge.set(1 if self.ready else 0)


class Watchdog:
    """Progress of the decode and model stages, for /healthz: stalled while one piece of their
    work (a batch's decodes, its device decode, its model call) has run longer than
    ``bound_s``. Only work inside those stages counts: a stage waiting for its input, or for room
    on its output queue behind a publish stall, is not running anything, so a publish stall never
    trips it (that one must not restart the pod; readiness shows it).

    ``running`` is entered and left on the event loop; :meth:`stalled` is read by the HTTP thread
    and by the ``shelfmatch_pipeline_stalled`` gauge at scrape time."""

    def __init__(self, bound_s: float, stalled_gauge: Gauge | None = None) -> None:
        self.bound_s = bound_s
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, float]] = {}  # token -> (stage, since)
        self._tokens = itertools.count()
        if stalled_gauge is not None:
            stalled_gauge.set_function(lambda: 1.0 if self.stalled() else 0.0)

    @contextlib.contextmanager
    def running(self, stage: str) -> Iterator[None]:
        """Around one piece of a stage's work (an await on a pool)."""
        token = next(self._tokens)
        with self._lock:
            self._running[token] = (stage, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                del self._running[token]

    def stuck(self, now: float | None = None) -> list[tuple[str, float]]:
        """(stage, seconds running) of every piece of work over the bound, oldest first."""
        now = time.monotonic() if now is None else now
        with self._lock:
            running = list(self._running.values())
        return sorted(((stage, now - since) for stage, since in running if now - since > self.bound_s),
                      key=lambda s: -s[1])

    def stalled(self, now: float | None = None) -> bool:
        return bool(self.stuck(now))
