"""Load generators: wrk for the saturating rate, and an open-loop client for latency at a rate.

wrk keeps a fixed number of connections busy (closed loop): it finds the most a server can do,
and its latencies are those of a saturated server. Latency at a given load needs an open loop,
as wrk2 does (wrk2 is not packaged by Debian): requests are due at fixed times whatever the
server does, and each latency is counted from when its request was due, so a slow answer also
delays, and is charged to, the requests queued behind it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

BEACON_SCRIPT = Path(__file__).resolve().with_name("beacon.lua")

# How wrk is installed where it is missing (Debian and Ubuntu package it).
WRK_INSTALL_HINT = "apt-get install wrk"

# The tag's Content-Type: a CORS simple request, so browsers send no preflight.
BEACON_CONTENT_TYPE = "text/plain;charset=UTF-8"


class LoadError(RuntimeError):
    """The load generator could not run, or the server answered in a way that voids a figure."""


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured; latencies in milliseconds."""

    requests: int  # answered
    seconds: float
    errors: int  # non-2xx answers, timeouts and socket errors
    p50_ms: float
    p99_ms: float
    max_ms: float
    offered_rate: float | None = None  # open loop only: requests per second asked for

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def beacon(run_hex: str, number: int) -> bytes:
    """The body of beacon ``number``: its own event id and click id, like beacon.lua's."""
    event_id = f"{run_hex}ff{number:022x}"  # "ff": never one of wrk's thread numbers
    return (
        f'{{"v":1,"id":"{event_id}","type":"form","callback":"bench-{event_id}","age_ms":0}}'
    ).encode()


# ---- wrk: the saturating rate ---------------------------------------------------------------


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise LoadError(f"wrk is not installed; install it with: {WRK_INSTALL_HINT}")
    return path


def saturate(url: str, *, seconds: float, connections: int, run_hex: str) -> LoadResult:
    """Post beacons to ``url`` from ``connections`` busy connections for ``seconds``."""
    command = [
        wrk_path(),
        "--threads", "1",  # one core for wrk, the other for the server: 2 are all we have
        "--connections", str(connections),
        "--duration", f"{max(1, round(seconds))}s",
        "--timeout", "10s",
        "--script", str(BEACON_SCRIPT),
        url,
        "--",
        run_hex,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    summary = next(
        (line for line in result.stdout.splitlines() if line.startswith("WRK_JSON ")), None
    )
    if result.returncode != 0 or summary is None:
        raise LoadError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    figures = json.loads(summary.removeprefix("WRK_JSON "))
    errors = sum(
        figures[name]
        for name in ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx")
    )
    return LoadResult(
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        errors=errors,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
    )


# ---- the open loop: latency at a fixed rate ----------------------------------------------------


def open_loop(
    url: str, *, rate: float, seconds: float, connections: int, run_hex: str
) -> LoadResult:
    """Post beacons to ``url`` at ``rate`` per second for ``seconds``, on up to ``connections``
    keep-alive connections; latencies count from when each request was due."""
    return asyncio.run(_open_loop(url, rate, seconds, connections, run_hex))


async def _open_loop(
    url: str, rate: float, seconds: float, connections: int, run_hex: str
) -> LoadResult:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    total = max(1, int(rate * seconds))
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    failures: list[str] = []

    async def connection_worker() -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (ticket := await due.get()) is not None:
            number, due_at = ticket
            request = _beacon_request(host, port, path, beacon(run_hex, number))
            status = None
            for _attempt in range(2):
                try:
                    if connection is None:
                        connection = await asyncio.open_connection(host, port)
                    status = await _exchange(*connection, request)
                    break
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    # The server closed a keep-alive connection (idle too long, or a worker
                    # restarting): open another and send again, once.
                    if connection is not None:
                        connection[1].close()
                    connection = None
            if status is None:
                failures.append("connection")
                continue
            latencies.append(loop.time() - due_at)
            if not 200 <= status < 300:
                failures.append(str(status))
        if connection is not None:
            connection[1].close()

    loop = asyncio.get_running_loop()
    workers = [asyncio.create_task(connection_worker()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # connections open before the clock starts
    started = loop.time()
    for number in range(total):
        due_at = started + number / rate
        delay = due_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((number, due_at))
    for _ in workers:
        due.put_nowait(None)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=seconds * 3 + 30)
    except TimeoutError:
        raise LoadError(
            f"the server fell behind {rate:.0f} requests/s: {len(latencies)} of {total} "
            f"answered in time"
        ) from None
    elapsed = loop.time() - started
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        errors=len(failures),
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=latencies[-1] * 1000 if latencies else math.nan,
        offered_rate=rate,
    )


def _beacon_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {BEACON_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    """Send one request and read its whole answer; returns the HTTP status."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
