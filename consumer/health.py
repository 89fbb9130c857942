"""Readiness and liveness as the service itself sees them, for /readyz, /healthz and the
``shelfmatch_ready`` gauge. Written by the stages on the event loop, read by the HTTP thread."""
from __future__ import annotations

import time

from prometheus_client import Gauge


class Health:
    """Ready means consuming (subscribed, not stopping, and the input topic exists), and publishing
    (the last attempt at delivering a batch succeeded). ``last_tick`` is the event loop's last
    proof of life."""

    def __init__(self, ready_gauge: Gauge | None = None) -> None:
        self.consuming = False
        self.input_found = True  # the broker's metadata knows the input topic
        self.publishing = True
        self.last_tick = time.monotonic()
        self._gauge = ready_gauge

    @property
    def ready(self) -> bool:
        return self.consuming and self.input_found and self.publishing

    def set(
        self, *, consuming: bool | None = None, publishing: bool | None = None, input_found: bool | None = None,
    ) -> None:
        if consuming is not None:
            self.consuming = consuming
        if input_found is not None:
            self.input_found = input_found
        if publishing is not None:
            self.publishing = publishing
        if self._gauge is not None:
            self._gauge.set(1 if self.ready else 0)
