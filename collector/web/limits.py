"""Who the client is, and how often it may send: proxy hops and rate limits on ``/collect``.

Two limits guard ``/collect`` (fixed windows, from the ``limits`` library that Flask-Limiter is
built on, called directly: the extension's per-request bookkeeping cost more CPU than the
rest of a beacon's validation): one per client IP, checked first, and one per click id,
checked once the beacon is valid. Answers past either limit are 429 with ``Retry-After``; the
tag keeps such events and sends them again later.

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

from flask import Flask, abort
from limits import RateLimitItem
from limits import parse as parse_limit
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter
from werkzeug.middleware.proxy_fix import ProxyFix

from .. import metrics
from ..config import Config
from .http import json_response

log = logging.getLogger("ks_collector.web")


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


class RateLimits:
    """The two /collect limits over one counter storage, shared by a worker's threads."""

    def __init__(self, config: Config):
        self.per_ip = parse_limit(config.rate_limit_ip)
        self.per_click = parse_limit(config.rate_limit_callback)
        self.config = config
        self.limiter = FixedWindowRateLimiter(
            storage_from_string(_storage_uri(config.rate_limit_storage_uri))
        )

    def check_client(self, address: str | None) -> None:
        self._hit(
            self.per_ip,
            "ip",
            address or "unknown",
            "rate_limit_ip",
            f"too many beacons from this address (limit {self.config.rate_limit_ip})",
        )

    def check_click(self, callback: str) -> None:
        # A digest, not the click id: keys can be logged by the storage and kept in Redis.
        digest = hashlib.sha256(callback.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        self._hit(
            self.per_click,
            "callback",
            digest,
            "rate_limit_callback",
            f"too many beacons for this click id (limit {self.config.rate_limit_callback})",
        )

    def _hit(self, limit: RateLimitItem, kind: str, key: str, reason: str, message: str) -> None:
        try:
            if self.limiter.hit(limit, "ks-collector", kind, key):
                return
            reset_at = self.limiter.get_window_stats(limit, "ks-collector", kind, key).reset_time
        except Exception as error:
            # Losing conversions is worse than a flood getting through: with the counters out
            # of reach, beacons are taken unlimited.
            log.warning("rate-limit storage unavailable, not limiting: %s", error)
            return
        metrics.EVENTS_REFUSED.labels("tag", reason).inc()
        response = json_response(429, error="rate_limited", message=message)
        response.headers["Retry-After"] = str(max(1, math.ceil(reset_at - time.time())))
        abort(response)


def _storage_uri(configured: str) -> str:
    return "ks-memory://" if configured.startswith("memory://") else configured
