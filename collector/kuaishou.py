"""The Kuaishou conversion client: one GET per event, and what its answer means.

The upstream URL comes from configuration only. Nothing an event carries can change the host,
the path or add parameters beyond the ones the catalog allows.
"""

from __future__ import annotations

import codecs
import contextlib
import email.utils
import json
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import urllib3
from urllib3.exceptions import NewConnectionError

from .store import DueEvent, Outcome

# Statuses that mean "not now" rather than "never": timeouts and rate limits.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
# What Kuaishou answers for a callback it cannot decode (the spec's one documented failure).
DECODE_FAILURE = "callbackinfo decodedfailure"
# Kuaishou's answers are tens of bytes; reading more than this only costs memory.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """What one call came to, before the relay decides when to try again."""

    outcome: Outcome
    latency_ms: int
    http_status: int | None = None
    response: str | None = None
    error: str | None = None
    retry_after_seconds: float | None = None


def build_params(event: DueEvent) -> dict[str, str]:
    """The query parameters for one event; the client percent-encodes each value once."""
    params = {
        "callback": event.callback,
        "event_type": str(event.event_type),
        "event_time": str(event.event_time_ms),
    }
    # The three that identify the conversion come from their own columns, whatever else an
    # event carries.
    params.update((name, value) for name, value in event.params.items() if name not in params)
    return params


def classify(status: int, body: str, headers: dict[str, str] | None = None) -> Answer:
    """Turn an HTTP answer into an outcome (latency is filled in by the caller)."""
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    if status == 200:
        try:
            document = json.loads(body)
        except ValueError:
            return Answer(Outcome.TRANSIENT, 0, status, body, "answer is not JSON")
        # 1 exactly: True == 1 in Python, and a bool is not Kuaishou's success answer.
        if (
            isinstance(document, dict)
            and type(document.get("result")) is int
            and (document["result"] == 1)
        ):
            return Answer(Outcome.DELIVERED, 0, status, body)
        if isinstance(document, dict) and document.get("error_msg"):
            return Answer(Outcome.REJECTED, 0, status, body, str(document["error_msg"])[:200])
        return Answer(
            Outcome.TRANSIENT, 0, status, body, "answer has neither result 1 nor error_msg"
        )
    if status in RETRYABLE_CLIENT_STATUSES or status >= 500:
        return Answer(Outcome.TRANSIENT, 0, status, body, f"HTTP {status}", retry_after)
    if 400 <= status < 500:
        return Answer(Outcome.REJECTED, 0, status, body, f"HTTP {status}")
    return Answer(Outcome.TRANSIENT, 0, status, body, f"unexpected HTTP {status}")


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Watchdog:
    """Shuts a call's socket when its time budget runs out, wherever the call is waiting.

    urllib3's timeouts bound each read, not the answer as a whole: an upstream that sends one
    header line, one byte of a chunk size or one empty gzip block every half second keeps a call
    going as long as it likes, past the event's lease, and another relay (or this one) sends the
    event again meanwhile. The reads of a chunked or compressed body loop inside http.client and
    urllib3, out of reach of a deadline checked between them. One thread per client looks over
    the calls under way ten times a second.
    """

    TICK_SECONDS = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[float, socket.socket]] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, key: int, sock: socket.socket, deadline: float) -> None:
        with self._lock:
            self._waiting[key] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kuaishou-watchdog", daemon=True
                )
                self._thread.start()

    def forget(self, key: int) -> None:
        with self._lock:
            self._waiting.pop(key, None)

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.wait(self.TICK_SECONDS):
            now = time.perf_counter()
            with self._lock:
                overdue = [key for key, (deadline, _) in self._waiting.items() if deadline <= now]
                sockets = [self._waiting.pop(key)[1] for key in overdue]
            for sock in sockets:
                # The blocked read returns at once; the call fails as out of time.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# The call this thread is making: its deadline, and the connection carrying it once it has one.
_current_call = threading.local()


def _watched(connection_class: type, watchdog: _Watchdog) -> type:
    """``connection_class`` watched from the wait for an answer's head until ``send()`` is done
    with the answer (it forgets the connection then)."""

    class WatchedConnection(connection_class):
        def getresponse(self) -> urllib3.BaseHTTPResponse:
            if self.sock is not None:
                watchdog.watch(id(self), self.sock, _current_call.deadline)
                _current_call.watched = id(self)
            return super().getresponse()

    return WatchedConnection


class KuaishouClient:
    """Sends events over a pool of keep-alive connections shared by the relay's threads.

    urllib3 directly, not requests: the relay makes one fixed-shape GET per event, and requests'
    per-call machinery (session merging, hooks, cookies, prepared requests, header dict copies)
    cost more CPU than the rest of the relay's work for that event together.
    """

    def __init__(self, upstream_url: str, timeout_seconds: float, pool_size: int):
        self.upstream_url = upstream_url
        self.timeout_seconds = timeout_seconds
        # One total budget for connect, sending and the answer's head; the body's reads are held
        # to what is left of it in send().
        timeout = urllib3.Timeout(total=timeout_seconds)
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._unusable: str | None = None
        try:
            url = urllib3.util.parse_url(upstream_url)
        except urllib3.exceptions.LocationParseError as error:
            url, self._unusable = None, f"InvalidURL: {error}"
        if url is not None and (url.scheme not in ("http", "https") or not url.host):
            # As requests did: the relay still runs and each call fails (and `doctor` says why).
            self._unusable = f"InvalidSchema: no way to send to {upstream_url!r}"
        if self._unusable is not None:
            return
        assert url is not None
        # The path and any fixed query come from configuration; the event's parameters are
        # appended to them, as requests did.
        self._path = url.path or "/"
        self._query_prefix = url.query + "&" if url.query else ""
        kind = urllib3.HTTPSConnectionPool if url.scheme == "https" else urllib3.HTTPConnectionPool
        extra = {"ca_certs": _ca_bundle()} if url.scheme == "https" else {}
        # Nothing is read from the environment (no proxy variables, no .netrc): a direct pool to
        # the configured host. block=False as requests had it: the relay never runs more calls
        # than pool_size at once, and a surplus call gets a fresh connection instead of waiting.
        self._watchdog = _Watchdog()
        self._pool = kind(
            url.host,
            url.port,
            maxsize=pool_size,
            block=False,
            retries=_NO_RETRIES,
            timeout=timeout,
            headers={
                "User-Agent": "ks-collector",
                # Answers are a few dozen bytes; compression would only let a broken upstream
                # send a small body that inflates to a large one.
                "Accept-Encoding": "identity",
                # The rest of what requests sent, so the upstream sees the same request head.
                "Accept": "*/*",
                "Connection": "keep-alive",
            },
            **extra,
        )
        self._pool.ConnectionCls = _watched(self._pool.ConnectionCls, self._watchdog)

    def send(self, event: DueEvent) -> Answer:
        """One call, bounded in time and size as a whole: a read timeout alone restarts with
        every byte, and an upstream dripping its answer would outlive the event's lease."""
        started = time.perf_counter()
        if self._pool is None:
            return Answer(Outcome.TRANSIENT, 0, error=self._unusable)
        deadline = started + self.timeout_seconds
        # urlencode quotes each name and value once (quote_plus), byte for byte what requests
        # sent: a click id's own '+', '/', '=' and '%' arrive as they were given.
        target = f"{self._path}?{self._query_prefix}{urlencode(build_params(event))}"
        response = None
        _current_call.deadline = deadline
        _current_call.watched = None
        try:
            response = self._pool.urlopen(
                "GET",
                target,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=True,
                release_conn=False,
            )
            body = bytearray()
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise _OutOfTime
                connection = response.connection
                if connection is not None and connection.sock is not None:
                    # Each wait for more of the body only gets what is left of the budget.
                    connection.sock.settimeout(remaining)
                # read1: whatever has arrived, so the deadline is checked as bytes trickle in.
                chunk = response.read1(8192)
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    return Answer(
                        Outcome.TRANSIENT,
                        _since(started),
                        response.status,
                        body[:500].decode("utf-8", "replace"),
                        f"answer longer than {MAX_ANSWER_BYTES} bytes",
                    )
        except NewConnectionError as error:
            # Refused or unresolvable: urllib3 files these under its connect timeouts.
            return Answer(Outcome.TRANSIENT, _since(started), error=_short(error, target))
        except (urllib3.exceptions.TimeoutError, _OutOfTime):
            return self._out_of_time(started)
        except urllib3.exceptions.HTTPError as error:
            if time.perf_counter() >= deadline:  # the watchdog shut the socket
                return self._out_of_time(started)
            return Answer(Outcome.TRANSIENT, _since(started), error=_short(error, target))
        finally:
            if _current_call.watched is not None:
                self._watchdog.forget(_current_call.watched)
            if response is not None:
                _give_back(response)
        text = body.decode(_charset(response.headers.get("Content-Type")), "replace")
        answer = classify(response.status, text, response.headers)
        return Answer(
            answer.outcome,
            _since(started),
            answer.http_status,
            answer.response,
            answer.error,
            answer.retry_after_seconds,
        )

    def _out_of_time(self, started: float) -> Answer:
        return Answer(
            Outcome.TRANSIENT,
            _since(started),
            error=f"no answer within {self.timeout_seconds:g} s",
        )

    def close(self) -> None:
        if self._pool is not None:
            self._watchdog.stop()
            self._pool.close()


class _OutOfTime(Exception):
    """The whole call's time budget ran out while the answer was still arriving."""


# No retries (the relay retries, with backoff, and records each try) and no redirects followed:
# a 3xx is an answer like any other (classify() makes it transient).
_NO_RETRIES = urllib3.Retry(total=False, redirect=False)


def _ca_bundle() -> str:
    """The CA bundle requests verified HTTPS against (certifi's), not the system's."""
    from requests.certs import where

    return where()


def _give_back(response: urllib3.BaseHTTPResponse) -> None:
    """Return the connection to the pool: reusable when the answer was read to its end, closed
    (so the pool opens a new one) when it was not."""
    if response.connection is not None and not response.isclosed():
        response.close()
    response.release_conn()


def _charset(content_type: str | None) -> str:
    """The answer's declared charset when Python knows it, else UTF-8."""
    if content_type:
        for parameter in content_type.split(";")[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "charset":
                value = value.strip().strip("'\"")
                try:
                    return codecs.lookup(value).name
                except LookupError:
                    break
    return "utf-8"


def _since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _short(error: Exception, target: str) -> str:
    """An exception as one line: what went wrong, without the URL's query (the click id)."""
    if isinstance(error, urllib3.exceptions.ProtocolError):
        # The names requests gave these, which the attempts table already holds.
        text = f"ConnectionError: {error}"
    elif isinstance(error, NewConnectionError):
        text = f"ConnectionError: {type(error).__name__}: {error}"
    else:
        text = f"{type(error).__name__}: {error}"
    path, _, query = target.partition("?")
    if query:
        text = text.replace(target, path).replace(query, "…")
    return text[:300]
