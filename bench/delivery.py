"""Beacon → upstream: how long a conversion takes from the tag's POST to Kuaishou's receipt.

``ks-collector serve`` (web workers and a relay, shipped settings) runs against a healthy mock
Kuaishou that answers at once; beacons are posted at a modest rate, one click id each. The
latency of a beacon is the mock's receive time minus the time just before it was posted (one
clock: everything runs on this machine).
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.loadgen import BEACON_CONTENT_TYPE, percentile
from bench.services import MockUpstream
from tests.support.processes import CollectorServer


@dataclass(frozen=True)
class DeliveryFigures:
    beacons: int
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def measure_delivery(
    database_url: str, *, beacons: int, rate: float, env: dict[str, str], log_dir: Path
) -> DeliveryFigures:
    mock = MockUpstream(log_dir, latency_ms=0, keep_requests=True).start()
    try:
        server = CollectorServer(
            env, database_url=database_url, upstream_url=mock.url, log_dir=log_dir
        ).start()
        try:
            sent_ms = post_beacons(server.url, beacons, rate)
            received_ms = _wait_for_calls(mock, sent_ms, server)
        finally:
            server.terminate(check=False)
    finally:
        mock.stop()
    latencies = sorted(received_ms[callback] - sent for callback, sent in sent_ms.items())
    return DeliveryFigures(
        beacons=beacons,
        rate=rate,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1],
    )


def post_beacons(base_url: str, beacons: int, rate: float) -> dict[str, float]:
    """Post ``beacons`` at ``rate`` per second on one keep-alive connection; callback → the
    wall-clock milliseconds just before each was sent."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    run = secrets.token_hex(4)
    sent_ms: dict[str, float] = {}
    started = time.monotonic()
    try:
        for number in range(beacons):
            pause = started + number / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            event_id = f"{run}{number:024x}"
            callback = f"latency-{event_id}"
            body = json.dumps(
                {"v": 1, "id": event_id, "type": "form", "callback": callback, "age_ms": 0}
            )
            sent_ms[callback] = time.time() * 1000
            connection.request(
                "POST", "/collect", body=body, headers={"Content-Type": BEACON_CONTENT_TYPE}
            )
            response = connection.getresponse()
            answer = response.read()
            if response.status != 202:
                raise RuntimeError(f"beacon {number} answered {response.status}: {answer!r}")
    finally:
        connection.close()
    return sent_ms


def _wait_for_calls(
    mock: MockUpstream, sent_ms: dict[str, float], server: CollectorServer
) -> dict[str, float]:
    """Callback → when the mock first received it, once every beacon has arrived."""
    deadline = time.monotonic() + 30
    while True:
        received: dict[str, float] = {}
        for call in mock.calls():
            callback = call["params"]["callback"][0]
            if callback in sent_ms:
                received.setdefault(callback, float(call["received_ms"]))
        if len(received) == len(sent_ms):
            return received
        if time.monotonic() > deadline or server.poll() is not None:
            missing = len(sent_ms) - len(received)
            raise RuntimeError(f"{missing} beacon(s) never reached the mock:\n{server.log_tail()}")
        time.sleep(0.2)
