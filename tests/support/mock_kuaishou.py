"""A stand-in for Kuaishou's conversion endpoint, ``GET /track/activate``, on 127.0.0.1.

It records every call and answers the way Kuaishou (or the network in front of it) might:
success, 5xx, 429, an HTML error page, a hang, a closed connection, a head that drips in line
by line (``drip_headers``) or the one documented failure body, ``callbackinfo decodedfailure``.
The behaviour changes at run time, from Python
(``MockKuaishou.set_mode``) or over HTTP on the same port:

- ``POST /__control`` with a JSON object of the settings to change (see ``Behaviour``);
- ``GET /__requests``: the recorded calls, oldest first;
- ``GET /__stats``: counts, for benchmarks that do not keep every call;
- ``POST /__reset``: forget the calls and go back to the default behaviour.

It speaks just enough HTTP/1.1 (keep-alive, pipelining, Content-Length bodies) for ``requests``,
``urllib3``, ``wrk`` and the relay, on asyncio streams so that hundreds of open connections and
an added latency cost no threads.

In-process::

    mock = MockKuaishou()
    url = mock.start()            # http://127.0.0.1:PORT/track/activate
    mock.set_mode("http_503", fail_first_n=2)
    mock.stop(); mock.start()     # "down" for a while, then back on the same port

As a process (the first line of stdout is the URL)::

    python -m tests.support.mock_kuaishou --port 0 --latency-ms 50 --record calls.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs

# The path Kuaishou serves conversions on; everything else but the control paths is a 404.
TRACK_PATH = "/track/activate"

# Every behaviour the mock knows, by the name used in Python and in the control API.
MODES = (
    "ok",
    "http_503",
    "http_500",
    "http_429",
    "html",
    "hang",
    "decode_failure",
    "close",
    "drip_headers",
)
# drip_headers: the status line, then one header line every this many seconds, for this long;
# each read of the answer gets a little, and no per-read timeout ever fires.
DRIP_INTERVAL_SECONDS = 0.2
DRIP_SECONDS = 30.0

# The largest request head accepted; Kuaishou callbacks are long but nowhere near this.
MAX_HEAD_BYTES = 64 * 1024

SUCCESS_BODY = b'{"result":1}'
DECODE_FAILURE_BODY = b'{"result":0,"error_msg":"callbackinfo decodedfailure","host-name":"mock"}'
# What a misbehaving proxy in front of the endpoint returns: a 200 that is not JSON.
PROXY_ERROR_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head><body>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>proxy</center></body></html>"
)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How the mock answers ``/track/activate``; every field is also a ``/__control`` key.

    ``mode`` applies to every call, or only to the first ``fail_first_n`` calls after it was set
    (then ``ok``) when that is given. ``callback_modes`` maps a callback prefix to a mode that wins
    over ``mode`` for the callbacks it matches, e.g. ``{"BAD": "decode_failure"}``.
    ``latency_ms`` is added before every answer. ``retry_after`` is the ``Retry-After`` header
    value sent with ``http_429``.
    """

    mode: str = "ok"
    latency_ms: float = 0
    fail_first_n: int | None = None
    retry_after: str = "1"
    callback_modes: tuple[tuple[str, str], ...] = ()

    def changed(self, **changes: Any) -> Behaviour:
        """A copy with ``changes`` applied after checking them; raises ``ValueError``."""
        unknown = set(changes) - {field.name for field in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if "callback_modes" in changes:
            prefixes = dict(changes["callback_modes"] or {})
            # Longest prefix first, so "BAD_SLOW" can override "BAD".
            changes["callback_modes"] = tuple(
                sorted(prefixes.items(), key=lambda item: len(item[0]), reverse=True)
            )
        if "latency_ms" in changes:
            changes["latency_ms"] = float(changes["latency_ms"])
        if changes.get("fail_first_n") is not None:
            changes["fail_first_n"] = int(changes["fail_first_n"])
        if "retry_after" in changes:
            changes["retry_after"] = str(changes["retry_after"])
        updated = dataclasses.replace(self, **changes)
        updated.validate()
        return updated

    def validate(self) -> None:
        for mode in (self.mode, *(mode for _, mode in self.callback_modes)):
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be zero or more")
        if self.fail_first_n is not None and self.fail_first_n < 0:
            raise ValueError("fail_first_n must be zero or more")

    def as_json(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        state["callback_modes"] = dict(self.callback_modes)
        return state


class _Request:
    """One parsed request head (and body, when it had one)."""

    __slots__ = ("body", "headers", "method", "path", "query", "version")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.version = version
        self.headers = headers
        self.body = b""

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class MockKuaishouApp:
    """The server itself, bound to whichever event loop calls ``open``.

    ``MockKuaishou`` runs it on a background thread; ``main`` runs it on the main thread. Its
    state is guarded by one lock so that the test thread can read and change it while the loop
    serves.
    """

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        keep_requests: bool = True,
        record_file: TextIO | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._behaviour = behaviour or Behaviour()
        self._failures_left = self._behaviour.fail_first_n
        self._keep_requests = keep_requests
        self._record_file = record_file
        self._records: list[dict[str, Any]] = []
        self._count = 0
        self._by_callback: collections.Counter[str] = collections.Counter()
        self._by_query: collections.Counter[str] = collections.Counter()
        self._by_outcome: collections.Counter[str] = collections.Counter()
        self._next_connection = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # -- state, safe to call from any thread -----------------------------------------------

    @property
    def behaviour(self) -> Behaviour:
        return self._behaviour

    def configure(self, **changes: Any) -> Behaviour:
        """Change only the given settings (see ``Behaviour``).

        A new ``mode`` without ``fail_first_n`` applies to every call; giving either one
        restarts the ``fail_first_n`` count.
        """
        if "mode" in changes:
            changes.setdefault("fail_first_n", None)
        with self._lock:
            self._behaviour = self._behaviour.changed(**changes)
            if "fail_first_n" in changes:
                self._failures_left = self._behaviour.fail_first_n
            return self._behaviour

    def reset(self) -> None:
        """Forget every recorded call and return to the default behaviour."""
        with self._lock:
            self._behaviour = Behaviour()
            self._failures_left = None
            self._records.clear()
            self._count = 0
            self._by_callback.clear()
            self._by_query.clear()
            self._by_outcome.clear()

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)

    def stats(self) -> dict[str, Any]:
        """Counts kept even when calls are not: totals, outcomes and repeated deliveries."""
        with self._lock:
            return {
                "count": self._count,
                "unique_callbacks": len(self._by_callback),
                "by_outcome": dict(self._by_outcome),
                "duplicate_callbacks": {k: n for k, n in self._by_callback.items() if n > 1},
                "duplicate_queries": {k: n for k, n in self._by_query.items() if n > 1},
            }

    def _record(self, request: _Request, connection: int, outcome: str | None = None) -> str:
        """Store one ``/track/activate`` call and decide its answer (unless given), atomically."""
        params = parse_qs(request.query, keep_blank_values=True)
        callback = params.get("callback", [""])[0]
        with self._lock:
            outcome = outcome or self._decide(callback)
            self._count += 1
            self._by_callback[callback] += 1
            self._by_query[request.query] += 1
            self._by_outcome[outcome] += 1
            record = {
                "seq": self._count,
                "received_ms": int(time.time() * 1000),
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "params": params,
                "headers": request.headers,
                "connection": connection,
                "outcome": outcome,
            }
            if self._keep_requests:
                self._records.append(record)
            if self._record_file is not None:
                self._record_file.write(json.dumps(record) + "\n")
        return outcome

    def _decide(self, callback: str) -> str:
        behaviour = self._behaviour
        for prefix, mode in behaviour.callback_modes:
            if callback.startswith(prefix):
                return mode
        if self._failures_left is None:
            return behaviour.mode
        if self._failures_left > 0:
            self._failures_left -= 1
            return behaviour.mode
        return "ok"

    # -- serving, on the event loop --------------------------------------------------------

    async def open(self, host: str, port: int) -> int:
        """Start listening; returns the bound port."""
        self._server = await asyncio.start_server(
            self._serve_connection,
            host,
            port,
            reuse_address=True,
            backlog=2048,
            limit=MAX_HEAD_BYTES,
        )
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every open connection, as a crashed server would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if self._record_file is not None:
            self._record_file.flush()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        with self._lock:
            self._next_connection += 1
            connection = self._next_connection
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as error:
                    writer.write(_response(error.status, b"", keep_alive=False))
                    await writer.drain()
                    break
                if request is None:
                    break
                keep_open = await self._answer(request, connection, reader, writer)
                if not keep_open:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by close(). Ending normally keeps Python 3.11's streams from logging the
            # cancellation as an error for every open connection.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self,
        request: _Request,
        connection: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Write the answer to one request; returns whether the connection stays open."""
        keep_alive = request.keep_alive
        if request.path == TRACK_PATH:
            if request.method != "GET":
                self._record(request, connection, outcome="http_405")
                writer.write(_response(405, b"", keep_alive=keep_alive))
                await writer.drain()
                return keep_alive
            outcome = self._record(request, connection)
            if self._behaviour.latency_ms:
                await asyncio.sleep(self._behaviour.latency_ms / 1000)
            if outcome == "hang":
                await _wait_for_hangup(reader)
                return False
            if outcome == "close":
                return False
            if outcome == "drip_headers":
                await _drip_headers(writer)
                return False
            writer.write(self._track_response(outcome, keep_alive))
        else:
            writer.write(self._control_response(request, keep_alive))
        await writer.drain()
        return keep_alive

    def _track_response(self, outcome: str, keep_alive: bool) -> bytes:
        if outcome == "ok":
            return _response(200, SUCCESS_BODY, keep_alive=keep_alive)
        if outcome == "decode_failure":
            return _response(200, DECODE_FAILURE_BODY, keep_alive=keep_alive)
        if outcome == "html":
            return _response(200, PROXY_ERROR_PAGE, "text/html", keep_alive=keep_alive)
        if outcome == "http_429":
            headers = (("Retry-After", self._behaviour.retry_after),)
            return _response(429, b"Too Many Requests", "text/plain", keep_alive, headers)
        status = 503 if outcome == "http_503" else 500
        return _response(status, _REASONS[status].encode(), "text/plain", keep_alive)

    def _control_response(self, request: _Request, keep_alive: bool) -> bytes:
        route = (request.method, request.path)
        if route == ("GET", "/__requests"):
            return _json_response(200, self.records(), keep_alive)
        if route == ("GET", "/__stats"):
            return _json_response(200, self.stats(), keep_alive)
        if route == ("POST", "/__reset"):
            self.reset()
            return _json_response(200, self._behaviour.as_json(), keep_alive)
        if route == ("GET", "/__control"):
            return _json_response(200, self._behaviour.as_json(), keep_alive)
        if route == ("POST", "/__control"):
            try:
                changes = json.loads(request.body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                behaviour = self.configure(**changes)
            except (ValueError, TypeError) as error:
                return _json_response(400, {"error": str(error)}, keep_alive)
            return _json_response(200, behaviour.as_json(), keep_alive)
        return _response(404, b"", keep_alive=keep_alive)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on a connection, or None when the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise _BadRequest(400) from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest(431) from None

    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise _BadRequest(400) from None
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()

    request = _Request(method, target, version, headers)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest(501)
    length = headers.get("content-length")
    if length:
        if not length.isdigit() or int(length) > MAX_HEAD_BYTES:
            raise _BadRequest(400)
        request.body = await reader.readexactly(int(length))
    return request


async def _wait_for_hangup(reader: asyncio.StreamReader) -> None:
    """Say nothing until the client gives up and closes, or the server stops."""
    while await reader.read(65536):
        pass


def _response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    keep_alive: bool = True,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        "Server: mock-kuaishou",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _drip_headers(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for number in range(int(DRIP_SECONDS / DRIP_INTERVAL_SECONDS)):
        await writer.drain()
        await asyncio.sleep(DRIP_INTERVAL_SECONDS)
        writer.write(f"X-Drip-{number}: 1\r\n".encode())


def _json_response(status: int, payload: Any, keep_alive: bool) -> bytes:
    return _response(status, json.dumps(payload).encode(), keep_alive=keep_alive)


class MockKuaishou:
    """The mock on a background thread of this process, for tests.

    Recorded calls, counters and the behaviour survive ``stop()`` and ``start()``, so a test can
    take the endpoint down (connections refused) and bring it back on the same port.
    """

    def __init__(self, host: str = "127.0.0.1", *, latency_ms: float = 0) -> None:
        self.host = host
        self.port: int | None = None
        self.app = MockKuaishouApp(Behaviour(latency_ms=latency_ms))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def url(self) -> str:
        """The endpoint URL, ``http://127.0.0.1:PORT/track/activate``."""
        if self.port is None:
            raise RuntimeError("the mock has not been started")
        return f"http://{self.host}:{self.port}{TRACK_PATH}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, where the control paths live."""
        return self.url[: -len(TRACK_PATH)]

    def start(self, port: int | None = None) -> str:
        """Listen on ``port`` (default: the previous port, else any free one); returns ``url``."""
        if self.running:
            raise RuntimeError("the mock is already running")
        if port is None:
            port = self.port or 0
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="mock-kuaishou", daemon=True)
        thread.start()
        try:
            bound = asyncio.run_coroutine_threadsafe(self.app.open(self.host, port), loop)
            self.port = bound.result(timeout=10)
        except BaseException:
            _stop_loop(loop, thread)
            raise
        self._loop, self._thread = loop, thread
        return self.url

    def stop(self) -> None:
        """Stop listening and drop every open connection; later connects are refused."""
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self.app.close(), loop).result(timeout=10)
        finally:
            _stop_loop(loop, thread)

    def __enter__(self) -> MockKuaishou:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_mode(self, mode: str | None = None, **changes: Any) -> Behaviour:
        """Change how calls are answered, e.g. ``set_mode("http_429", retry_after=30)``.

        Only the given settings change (see ``Behaviour``); a mode given without
        ``fail_first_n`` applies to every call.
        """
        if mode is not None:
            changes["mode"] = mode
        return self.app.configure(**changes)

    def reset(self) -> None:
        self.app.reset()

    def requests(self) -> list[dict[str, Any]]:
        """Every recorded ``/track/activate`` call, oldest first.

        Each is a dict: ``seq``, ``received_ms`` (Unix ms), ``method``, ``path``, ``query`` (raw),
        ``params`` (``parse_qs`` with blank values kept: name → list of values), ``headers``
        (lower-case names), ``connection`` (a number per TCP connection) and ``outcome`` (the mode
        it was answered with).
        """
        return self.app.records()

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def wait_for_requests(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait until at least ``count`` calls arrived; returns them, or raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.requests()
            if len(records) >= count:
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"mock Kuaishou got {len(records)} call(s) in {timeout}s, expected {count}"
                )
            time.sleep(0.02)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    if not thread.is_alive():
        loop.close()


async def _serve_forever(args: argparse.Namespace) -> None:
    record_file = open(args.record, "a", encoding="utf-8") if args.record else None  # noqa: SIM115
    behaviour = Behaviour().changed(mode=args.mode, latency_ms=args.latency_ms)
    app = MockKuaishouApp(behaviour, keep_requests=args.keep_requests, record_file=record_file)
    port = await app.open(args.host, args.port)
    print(f"http://{args.host}:{port}{TRACK_PATH}", flush=True)

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await app.close()
    if record_file is not None:
        record_file.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.mock_kuaishou",
        description="Mock Kuaishou conversion endpoint; prints its URL, runs until SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0, help="added before each answer")
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--record", type=Path, help="append every call to FILE as JSON lines")
    parser.add_argument(
        "--keep-requests",
        action="store_true",
        help="also keep calls in memory for GET /__requests (off: long benchmarks)",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the mock listens on loopback only")
    asyncio.run(_serve_forever(args))


if __name__ == "__main__":
    sys.exit(main())
