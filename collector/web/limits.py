"""Who the client is, and how often it may send: proxy hops and rate limits on ``/collect``.

Two limits guard ``/collect`` (Flask-Limiter, fixed windows): one per client IP and one per
click id, the latter keyed by the callback inside the beacon. Answers past either limit are
429 with ``Retry-After``; the tag keeps such events and sends them again later.

Counters live where ``KS_COLLECTOR_RATE_LIMIT_STORAGE_URI`` says. The default, ``memory://``,
is private to each gunicorn worker process: with N workers a client can get up to N times the
limit through before every worker has refused it. ``redis://`` shares the counters between
workers and machines.

The server API is not limited here: its callers hold tokens, and a CRM catching up on a backlog
must not be slowed down.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time

from flask import Flask, Response, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.storage import Storage
from werkzeug.middleware.proxy_fix import ProxyFix

from .. import metrics
from ..config import Config
from . import collect
from .http import json_response

log = logging.getLogger("ks_collector.web")

# When the limiter cannot say when its window ends (its storage is down), wait this long.
FALLBACK_RETRY_AFTER_SECONDS = 60


class WindowCounters(Storage):
    """In-process fixed-window counters, used for ``memory://``.

    ``limits``' own memory storage re-arms a timer thread every 10 ms that walks every key; the
    per-click limit makes one key per click id, so under steady traffic that walk grew to a
    whole core (17 ms per sweep at 60,000 keys, measured by the benchmark). Here expired
    windows are dropped at most once a second, by whichever request comes along.
    """

    STORAGE_SCHEME = ["ks-memory"]  # noqa: RUF012 (the limits registry reads this list)
    SWEEP_SECONDS = 1.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options):
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # key → [count, window end]
        self._next_sweep = 0.0
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            if now >= self._next_sweep:
                self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
                self._next_sweep = now + self.SWEEP_SECONDS
            window = self._windows.get(key)
            if window is None or window[1] <= now:
                window = self._windows[key] = [0, now + expiry]
            window[0] += amount
            return int(window[0])

    def get(self, key: str) -> int:
        window = self._windows.get(key)
        return int(window[0]) if window and window[1] > time.time() else 0

    def get_expiry(self, key: str) -> float:
        window = self._windows.get(key)
        return window[1] if window else time.time()

    def check(self) -> bool:
        return True

    def reset(self) -> int:
        with self._lock:
            count, self._windows = len(self._windows), {}
        return count

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)


def trust_proxies(app: Flask, hops: int) -> None:
    """Believe the last ``hops`` entries of X-Forwarded-For, added by our own proxies.

    Entries further left are whatever the client sent and are ignored, so a forged header
    cannot make one client look like many. With no proxies the socket's peer is the client.
    """
    if hops > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=0, x_host=0, x_port=0)


def client_ip_key() -> str:
    return "ip:" + (request.remote_addr or "unknown")


def callback_key() -> str:
    """A digest, not the click id: keys can be logged by the storage and kept in Redis."""
    callback = collect.beacon_callback() or ""
    digest = hashlib.sha256(callback.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return "callback:" + digest


def no_callback() -> bool:
    # A beacon without a readable click id is refused by the view anyway (400, 413 or 422),
    # after the per-IP limit has counted it.
    return collect.beacon_callback() is None


def install_rate_limits(app: Flask, config: Config) -> Limiter:
    """Limit ``/collect`` per client IP and per click id, as configured."""
    limiter = Limiter(
        client_ip_key,
        app=app,
        storage_uri=_storage_uri(config.rate_limit_storage_uri),
        strategy="fixed-window",
        key_prefix="ks-collector",
        # Losing conversions is worse than a flood getting through: if the counters cannot be
        # reached, beacons are taken unlimited (and the storage error is logged).
        swallow_errors=True,
        headers_enabled=False,
    )
    # Flask-Limiter logs every breach with its key, i.e. a client IP; we keep no client IPs.
    logging.getLogger("flask-limiter").setLevel(logging.WARNING)

    view = app.view_functions["collect.collect"]
    view = limiter.limit(
        config.rate_limit_callback,
        key_func=callback_key,
        exempt_when=no_callback,
        error_message=f"too many beacons for this click id (limit {config.rate_limit_callback})",
    )(view)
    view = limiter.limit(
        config.rate_limit_ip,
        key_func=client_ip_key,
        error_message=f"too many beacons from this address (limit {config.rate_limit_ip})",
    )(view)
    # The limits are checked by the wrapped view, so it replaces the one the blueprint registered.
    app.view_functions["collect.collect"] = view

    app.extensions["ks_limiter"] = limiter
    app.register_error_handler(RateLimitExceeded, rate_limited)
    return limiter


def _storage_uri(configured: str) -> str:
    return "ks-memory://" if configured.startswith("memory://") else configured


def rate_limited(error: RateLimitExceeded) -> Response:
    limiter: Limiter = current_app.extensions["ks_limiter"]
    reason = "rate_limit_callback" if error.limit.key_func is callback_key else "rate_limit_ip"
    metrics.EVENTS_REFUSED.labels("tag", reason).inc()
    response = json_response(429, error="rate_limited", message=error.description)
    response.headers["Retry-After"] = str(_seconds_until_reset(limiter))
    return response


def _seconds_until_reset(limiter: Limiter) -> int:
    breached = limiter.current_limit
    try:
        reset_at = breached.reset_at if breached is not None else None
    except Exception:  # the storage went away between the check and now
        reset_at = None
    if reset_at is None:
        return FALLBACK_RETRY_AFTER_SECONDS
    return max(1, math.ceil(reset_at - time.time()))
