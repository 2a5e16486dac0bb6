"""The processes a benchmark starts besides ks-collector's own: the baseline app and the mock.

``ks-collector`` itself runs through tests/support/processes.py, as in the tests; these two are
plain Python modules, so they get a small wrapper of their own with the same habits: a session
of their own, a log file, SIGTERM to the whole group when done and SIGKILL if that is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.processes import children_of, free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[1]

# How long a service gets to start, and to exit after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class Service:
    """One Python module run as a process in its own session, logging to ``log_dir``."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path):
        self.name = name
        self.command = [sys.executable, *args]
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.command,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} has not been started"
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait()


class BareApp(Service):
    """bench/bare_app.py under the collector's gunicorn settings, on a free loopback port."""

    def __init__(self, log_dir: Path, *, workers: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            "bare-app",
            [
                "-m", "bench.bare_app",
                "--bind", f"127.0.0.1:{self.port}",
                "--workers", str(workers),
                "--threads", str(threads),
            ],
            log_dir,
        )  # fmt: skip

    def start(self) -> BareApp:
        super().start()
        try:
            wait_for_http(self.url + "/healthz", START_TIMEOUT)
        except AssertionError as error:
            self.stop()
            raise RuntimeError(f"{error}\n{self.log_text()[-3000:]}") from None
        return self

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master is the process we started."""
        return children_of(self.pid)


class MockUpstream(Service):
    """tests/support/mock_kuaishou.py as a process of its own, answering after ``latency_ms``."""

    def __init__(self, log_dir: Path, *, latency_ms: float, keep_requests: bool = False):
        args = ["-m", "tests.support.mock_kuaishou", "--port", "0", "--latency-ms", f"{latency_ms}"]
        if keep_requests:
            args.append("--keep-requests")
        super().__init__(f"mock-kuaishou-{latency_ms:g}ms", args, log_dir)
        self.url = ""

    def start(self) -> MockUpstream:
        super().start()
        deadline = time.monotonic() + START_TIMEOUT
        # The mock's first line of output is its URL.
        while not self.url:
            first_line = self.log_text().partition("\n")[0]
            if first_line.startswith("http://") and self.log_text().count("\n"):
                self.url = first_line.strip()
            elif self.exited() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the mock did not start:\n{self.log_text()[-3000:]}")
            else:
                time.sleep(0.05)
        return self

    @property
    def base_url(self) -> str:
        return self.url.rsplit("/track/", 1)[0]

    def stats(self) -> dict[str, Any]:
        return _get_json(self.base_url + "/__stats")

    def calls(self) -> list[dict[str, Any]]:
        """Every recorded call (only when started with ``keep_requests``)."""
        return _get_json(self.base_url + "/__requests")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())
