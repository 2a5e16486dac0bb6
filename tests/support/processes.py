"""Run the real ``ks-collector`` commands as subprocesses, the way an operator would.

Every process starts in a session (and so a process group) of its own, writes its stdout and
stderr to a log file, and is registered in ``LIVE_PROCESSES`` until it and everything it started
have exited, so that the fixtures in ``tests/conftest.py`` can show the logs of a failed test and
SIGKILL whatever a test left running. Each child gets a clean environment: ``KS_COLLECTOR_*``
variables of the calling shell are dropped and only those the test gives are set; the upstream
URL must point at loopback, so a test can never send a conversion to Kuaishou's real host.

``ks-collector serve`` starts gunicorn and the relay in sessions of their own, so neither the
process group nor the parent links (lost when a parent dies) find all of a process's
descendants. Instead every child gets a unique ``KS_TEST_PROCESS_TAG`` in its environment, which
its descendants inherit, and the harness finds them by that tag in ``/proc/PID/environ``.

- ``CollectorServer``: ``ks-collector serve`` (migrations, gunicorn and the relay).
- ``WebProcess``: ``ks-collector web`` (gunicorn only), with its master and worker pids.
- ``RelayProcess``: ``ks-collector relay``.
- ``run_cli``: any other command, e.g. ``run_cli(["migrate"], env)``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Hosts the children may be pointed at; anything else is refused before a process starts.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Where the upstream points when a test gives none: the discard port, which nothing serves.
UNREACHABLE_UPSTREAM = "http://127.0.0.1:9/track/activate"

# How long a process gets to become ready, and to exit after SIGTERM, unless told otherwise.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

# Processes started and not yet seen to exit, oldest first (see tests/conftest.py).
LIVE_PROCESSES: list[ManagedProcess] = []

# Every process started in this pytest run, for attaching logs to a failed test's report.
STARTED_PROCESSES: list[ManagedProcess] = []

# The environment variable that marks a started process and all its descendants.
TAG_VARIABLE = "KS_TEST_PROCESS_TAG"

_log_numbers = itertools.count(1)


class HarnessError(AssertionError):
    """A process did not start, stop or behave as the harness expects; includes its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if it is taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(
    url: str,
    timeout: float = START_TIMEOUT,
    *,
    status: int = 200,
    process: ManagedProcess | None = None,
) -> None:
    """Poll ``url`` until it answers ``status``; fails early if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise HarnessError(
                f"{process.name} exited with {process.returncode} before {url} answered\n"
                + process.log_tail()
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            if error.code == status:
                return
            last_error = f"HTTP {error.code}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.05)
    tail = process.log_tail() if process is not None else ""
    raise HarnessError(f"{url} did not answer {status} within {timeout}s ({last_error})\n{tail}")


def cli_command() -> list[str]:
    """How to run ``ks-collector``: the console script beside this Python, on PATH, or ``-m``."""
    beside_python = Path(sys.executable).with_name("ks-collector")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return [str(beside_python)]
    on_path = shutil.which("ks-collector")
    if on_path:
        return [on_path]
    return [sys.executable, "-m", "collector"]


def collector_env(
    env: Mapping[str, str] | None = None,
    *,
    database_url: str | None = None,
    upstream_url: str | None = None,
) -> dict[str, str]:
    """The environment of a child: ours without ``KS_COLLECTOR_*``, plus the test's settings.

    ``database_url`` and ``upstream_url`` become ``KS_COLLECTOR_DATABASE_URL`` and
    ``KS_COLLECTOR_UPSTREAM_URL``; the upstream defaults to a loopback port nothing listens on,
    and a non-loopback upstream is refused.
    """
    child = {key: value for key, value in os.environ.items() if not key.startswith("KS_COLLECTOR_")}
    child["PYTHONUNBUFFERED"] = "1"
    child.update(env or {})
    if database_url is not None:
        child["KS_COLLECTOR_DATABASE_URL"] = database_url
    if upstream_url is not None:
        child["KS_COLLECTOR_UPSTREAM_URL"] = upstream_url
    child.setdefault("KS_COLLECTOR_UPSTREAM_URL", UNREACHABLE_UPSTREAM)
    host = urlsplit(child["KS_COLLECTOR_UPSTREAM_URL"]).hostname
    if host not in LOOPBACK_HOSTS:
        raise HarnessError(f"tests may only relay to loopback, not to {host!r}")
    return child


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    database_url: str | None = None,
    upstream_url: str | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``ks-collector ARGS`` to completion; raises ``HarnessError`` on failure if ``check``."""
    command = [*cli_command(), *args]
    result = subprocess.run(
        command,
        env=collector_env(env, database_url=database_url, upstream_url=upstream_url),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise HarnessError(
            f"{' '.join(command)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def process_table() -> dict[int, tuple[int, str]]:
    """Every live (non-zombie) process: pid → (parent pid, state letter)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if state not in ("Z", "X"):
            table[int(entry)] = (ppid, state)
    return table


def children_of(pid: int) -> list[int]:
    """Live child pids of ``pid``, lowest first."""
    return sorted(child for child, (ppid, _) in process_table().items() if ppid == pid)


def tagged_pids(tag: str) -> list[int]:
    """Live pids whose environment carries ``KS_TEST_PROCESS_TAG=tag``, lowest first."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for pid in process_table():
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except OSError:
            continue
        if marker in variables:
            found.append(pid)
    return found


def command_line(pid: int) -> list[str]:
    """The arguments ``pid`` was started with (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]
    except OSError:
        return []


class ManagedProcess:
    """One subprocess in its own process group, logging to a file, killed at teardown."""

    name = "process"

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        database_url: str | None = None,
        upstream_url: str | None = None,
        log_dir: Path | str | None = None,
    ) -> None:
        self.args = list(args)
        self.tag = uuid.uuid4().hex
        self.env = collector_env(env, database_url=database_url, upstream_url=upstream_url)
        self.env[TAG_VARIABLE] = self.tag
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="ks-logs-"))
        self.log_path: Path | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.killed_after_timeout = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        if self.popen is not None and self.popen.poll() is None:
            raise HarnessError(f"{self.name} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{next(_log_numbers)}.log"
        command = [*cli_command(), *self.args]
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        LIVE_PROCESSES.append(self)
        STARTED_PROCESSES.append(self)
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise HarnessError(f"{self.name} has not been started")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.returncode

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the main process to exit; returns its exit code."""
        assert self.popen is not None
        code = self.popen.wait(timeout)
        self._forget_if_gone()
        return code

    def send_signal(self, signum: int) -> None:
        """Signal the main process only (as a supervisor or Ctrl-C in its terminal would)."""
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self, timeout: float = STOP_TIMEOUT, *, check: bool = True) -> int:
        """SIGTERM the main process and wait for it and everything it started to exit.

        If the main process outlives ``timeout``, or exits leaving descendants behind, all of
        them are SIGKILLed and, when ``check``, ``HarnessError`` says so: a clean shutdown is
        part of the product's contract.
        """
        if self.popen is None:
            return 0
        self.send_signal(signal.SIGTERM)
        problem = ""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed_after_timeout = True
            problem = f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s; killed"
            self.kill()
            code = self.popen.wait()
        leftovers = self._wait_for_tree_exit(timeout=5)
        if leftovers:
            details = ", ".join(f"{pid} {' '.join(command_line(pid))}" for pid in leftovers)
            problem = problem or f"{self.name} exited but left processes running: {details}"
            self.kill()
        self._forget_if_gone()
        if problem and check:
            raise HarnessError(problem + "\n" + self.log_tail())
        return code

    stop = terminate

    def kill(self) -> None:
        """SIGKILL the process and all its descendants at once (a power cut, as they see it).

        All of them are first stopped (SIGSTOP, repeated until no new one appears), so that
        none can react to another's death, e.g. gunicorn respawning a worker or a child
        getting its parent-death signal and shutting down gracefully.
        """
        if self.popen is None:
            return
        deadline = time.monotonic() + 10
        stopped: set[int] = set()
        while time.monotonic() < deadline:
            fresh = [pid for pid in tagged_pids(self.tag) if pid not in stopped]
            if not fresh:
                break
            for pid in fresh:
                _signal_quietly(pid, signal.SIGSTOP)
            stopped.update(fresh)
        for pid in stopped:
            _signal_quietly(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        leftovers = self._wait_for_tree_exit(timeout=5)
        for pid in leftovers:
            _signal_quietly(pid, signal.SIGKILL)
        self._forget_if_gone()

    def __enter__(self) -> ManagedProcess:
        if self.popen is None:
            self.start()
        return self

    def __exit__(self, exc_type: Any, *_: object) -> None:
        # With an exception already on its way, a shutdown problem must not hide it.
        self.terminate(check=exc_type is None)

    # -- inspection ------------------------------------------------------------------------

    def tree_pids(self) -> list[int]:
        """Live pids of this process and everything it started, however detached."""
        return tagged_pids(self.tag) if self.popen is not None else []

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def _wait_for_tree_exit(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            members = self.tree_pids()
            if not members or time.monotonic() > deadline:
                return members
            time.sleep(0.05)

    def _forget_if_gone(self) -> None:
        if self in LIVE_PROCESSES and self.poll() is not None and not self.tree_pids():
            LIVE_PROCESSES.remove(self)


def _signal_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


class HttpProcess(ManagedProcess):
    """A process serving HTTP on ``127.0.0.1:PORT``, ready once ``GET /healthz`` answers 200."""

    command = ""  # the ks-collector subcommand

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        workers: int = 2,
        threads: int | None = None,
        database_url: str | None = None,
        upstream_url: str | None = None,
        log_dir: Path | str | None = None,
    ) -> None:
        self.workers = workers
        self.threads = threads
        self.port: int | None = None
        self._base_args = [self.command]
        super().__init__(
            self._base_args,
            env=env,
            database_url=database_url,
            upstream_url=upstream_url,
            log_dir=log_dir,
        )

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self.port is None:
            raise HarnessError(f"{self.name} has not been started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> HttpProcess:
        """Start on a free port and wait for ``/healthz``; a port taken meanwhile is retried."""
        for attempt in range(3):
            self.port = free_port()
            self.args = [*self._base_args, "--bind", f"127.0.0.1:{self.port}"]
            self.args += ["--workers", str(self.workers)]
            if self.threads is not None:
                self.args += ["--threads", str(self.threads)]
            super().start()
            try:
                wait_for_http(self.url + "/healthz", timeout, process=self)
                return self
            except HarnessError:
                log = self.log_text()
                port_taken = "Address already in use" in log or "Connection in use" in log
                self.kill()
                if not port_taken or attempt == 2:
                    raise
        raise AssertionError("unreachable")


class CollectorServer(HttpProcess):
    """``ks-collector serve``: migrations, gunicorn web workers and the relay, as one command."""

    name = "serve"
    command = "serve"


class WebProcess(HttpProcess):
    """``ks-collector web``: gunicorn alone, no relay; run ``run_cli(["migrate"])`` first."""

    name = "web"
    command = "web"

    @property
    def master_pid(self) -> int:
        """The gunicorn master: our child itself, or its only child if it ran gunicorn as one.

        Gunicorn's workers never have children of their own, so a single child that does is
        the master; otherwise the process we started is.
        """
        children = children_of(self.pid)
        if len(children) == 1 and children_of(children[0]):
            return children[0]
        return self.pid

    def worker_pids(self) -> list[int]:
        """The live gunicorn worker pids (children of the master), lowest first."""
        return children_of(self.master_pid)

    def wait_for_workers(
        self, count: int | None = None, timeout: float = START_TIMEOUT
    ) -> list[int]:
        """Wait until ``count`` (default: ``workers``) workers run; returns their pids."""
        count = self.workers if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) >= count:
                return pids
            if self.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name}: {len(pids)} of {count} workers running\n" + self.log_tail()
                )
            time.sleep(0.05)


class RelayProcess(ManagedProcess):
    """``ks-collector relay``: delivers the outbox; run ``run_cli(["migrate"])`` first."""

    name = "relay"

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        database_url: str | None = None,
        upstream_url: str | None = None,
        log_dir: Path | str | None = None,
    ) -> None:
        super().__init__(
            ["relay"],
            env=env,
            database_url=database_url,
            upstream_url=upstream_url,
            log_dir=log_dir,
        )


def kill_all(processes: Sequence[ManagedProcess] | None = None) -> list[ManagedProcess]:
    """SIGKILL ``processes`` (default: every live one) and their trees; returns those that ran."""
    killed = []
    for process in list(LIVE_PROCESSES if processes is None else processes):
        if process.tree_pids():
            killed.append(process)
        process.kill()
    return killed


# Scripts that use the harness outside pytest (benchmarks) get the same promise at exit.
atexit.register(kill_all)
