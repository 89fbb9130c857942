"""``shelfmatch consume`` as a real child process, as operators run it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One consumer process; its output goes to a log file that a failing test prints."""

    def __init__(self, settings: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SHELFMATCH_METRICS_HOST": "127.0.0.1",
            "SHELFMATCH_METRICS_PORT": str(self.port),
            "SHELFMATCH_DEVICE": "cpu",
            **settings,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "consume"], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def _wait(self, answered: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if answered():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"service not {what} after {timeout_s}s:\n{self.log()}")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        self._wait(lambda: self.get("/readyz")[0] == 200, timeout_s, "ready")

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        """Until /healthz answers at all (the model is loaded, HTTP is up), ready or not."""
        self._wait(lambda: self.get("/healthz")[0] > 0, timeout_s, "serving HTTP")

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
