"""Process management: gunicorn for the web layer, the relay loop, and ``serve`` running both."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from gunicorn.app.base import BaseApplication

from .config import Config

log = logging.getLogger("ks_collector.server")

# A relay that crashes is started again after this pause (events wait safely in the outbox).
RELAY_RESTART_SECONDS = 1.0
# How long `serve` waits for its children to finish in-flight work on SIGTERM.
STOP_GRACE_SECONDS = 30.0


def is_loopback_bind(bind: str) -> bool:
    """True for ``127.0.0.1:8000``, ``[::1]:8000``, ``localhost:8000`` and unix sockets."""
    if bind.startswith("unix:"):
        return True
    host = bind.rpartition(":")[0] if bind.rpartition(":")[2].isdigit() else bind
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _die_with_parent() -> None:
    """In a child: get SIGTERM if `serve` itself dies, so no orphan keeps the port."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def check_bind_is_safe(bind: str, config: Config) -> None:
    """Refuse a public bind without an origin allowlist; warn when the allowlist is ``*``
    (on loopback too: a proxy in front makes any bind public)."""
    if "*" in config.allowed_origins:
        log.warning(
            "KS_COLLECTOR_ALLOWED_ORIGINS is '*': tag events are accepted from any "
            "page on the internet"
        )
    if is_loopback_bind(bind) or config.allowed_origins:
        return
    raise SystemExit(
        f"refusing to listen on {bind} with no KS_COLLECTOR_ALLOWED_ORIGINS: anyone could "
        "post conversions for your landing pages. Set the origins of your landing pages, "
        "or '*' to accept any page deliberately."
    )


class GunicornApp(BaseApplication):
    """gunicorn embedded, so `ks-collector web` needs no separate config file."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings newer than the installed gunicorn are skipped
                self.cfg.set(key, value)

    def load(self) -> Any:
        from .web import create_app

        return create_app()


def _child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def run_web(bind: str, workers: int, threads: int) -> None:
    """Run gunicorn in this process until it is told to stop."""
    own_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Run alone, not under `serve`: without a shared directory each worker would count for
        # itself and /metrics would show whichever worker answered the scrape.
        own_metrics_dir = prepare_metrics_dir(Config.from_env())
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    try:
        _run_gunicorn(bind, workers, threads)
    finally:
        if own_metrics_dir and not Config.from_env().metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _run_gunicorn(bind: str, workers: int, threads: int) -> None:
    GunicornApp(
        {
            "bind": bind,
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread" if threads > 1 else "sync",
            "accesslog": None,
            "errorlog": "-",
            # gunicorn's own messages in the collector's format (one JSON object per line too).
            "logger_class": "collector.logs.GunicornLogger",
            "graceful_timeout": 20,
            "timeout": 30,
            "keepalive": 5,
            # The image fallback carries a whole beacon (up to 8 KB) in its query string.
            "limit_request_line": 8190,
            "child_exit": _child_exit,
            "proc_name": "ks-collector-web",
            # gunicorn 25+ opens one control socket per user by default; two collectors would clash.
            "control_socket_disable": True,
        }
    ).run()


def run_relay(config: Config) -> None:
    """Run one relay in this process until SIGTERM or SIGINT, then finish in-flight work."""
    from .relay import Relay
    from .store import open_store

    store = open_store(config.database_url)
    relay = Relay(store, config)

    def stop(signum: int, _frame: Any) -> None:
        log.info("relay got %s: finishing in-flight requests", signal.Signals(signum).name)
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay.run()
    store.close()


# The files prometheus_client's multiprocess mode writes: one per metric kind and process.
METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")


def prepare_metrics_dir(config: Config) -> str:
    """A multiprocess directory without counters from a previous run. Only prometheus_client's
    own files are removed from a configured one, which may hold anything: emptying it whole
    would delete whatever else is there (the outbox, for one)."""
    if not config.metrics_dir:
        return tempfile.mkdtemp(prefix="ks-collector-metrics-")
    try:
        os.makedirs(config.metrics_dir, exist_ok=True)
        names = sorted(os.listdir(config.metrics_dir))
    except OSError as error:
        raise SystemExit(
            f"KS_COLLECTOR_METRICS_DIR={config.metrics_dir} cannot be used as a directory: "
            f"{error.strerror or error}"
        ) from None
    foreign = []
    for name in names:
        if METRICS_FILE.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(config.metrics_dir, name))
        elif name.endswith(".db"):
            foreign.append(name)
    if foreign:
        # prometheus_client reads every *.db there as metrics: /metrics would fail on them.
        raise SystemExit(
            f"KS_COLLECTOR_METRICS_DIR={config.metrics_dir} holds {', '.join(foreign)}: give "
            "the metrics a directory of their own (prometheus_client reads every *.db file "
            "there as its own)"
        )
    return config.metrics_dir


def serve(bind: str, workers: int, threads: int, config: Config) -> int:
    """Run gunicorn and a relay as child processes; stop both on SIGTERM or Ctrl-C.

    The caller has checked the bind address (``check_bind_is_safe``) and migrated the store.
    """
    env = dict(os.environ)
    env["PROMETHEUS_MULTIPROC_DIR"] = prepare_metrics_dir(config)
    base = [sys.executable, "-m", "collector"]
    # Own sessions: Ctrl-C reaches only `serve`, which stops the children gracefully (a SIGINT
    # would make gunicorn drop requests in flight).
    child = {"env": env, "start_new_session": True, "preexec_fn": _die_with_parent}
    web = subprocess.Popen(
        [
            *base,
            "web",
            "--bind",
            bind,
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--no-migrate",
        ],
        **child,
    )
    relay = subprocess.Popen([*base, "relay", "--no-migrate"], **child)
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            log.info("got %s: stopping web and relay", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving on http://%s (%d workers x %d threads) with a relay", bind, workers, threads)
    exit_code = 0
    while not stopping.is_set():
        if web.poll() is not None:
            log.error("web server exited with %s; stopping", web.returncode)
            exit_code = web.returncode or 1
            break
        if relay.poll() is not None:
            log.error("relay exited with %s; starting it again", relay.returncode)
            time.sleep(RELAY_RESTART_SECONDS)
            relay = subprocess.Popen([*base, "relay", "--no-migrate"], **child)
        stopping.wait(0.2)

    for child in (web, relay):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in (web, relay):
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("pid %d did not stop in %.0f s; killing it", child.pid, STOP_GRACE_SECONDS)
            child.kill()
            child.wait()
    if not config.metrics_dir:
        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return exit_code
