"""Many writers at once, and a slow Kuaishou: intake must not feel either.

Gunicorn workers take beacons while a relay claims and records: the store's contention must
never reach a client ("database is locked", 5xx), and every beacon must reach Kuaishou once.
A Kuaishou that does not answer must not slow intake: the web layer never waits on it.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from collector.store import SqlStore
from tests.fault.helpers import (
    QUICK_RELAY_ENV,
    all_finished,
    delivery_figures,
    engine_of,
    send_beacon,
    status_counts,
    wait_until,
)
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import CollectorServer, RelayProcess, WebProcess

BEACONS = 3000
CLIENT_THREADS = 20
# Beacons from one test client would otherwise hit the per-IP and per-click rate limits.
UNLIMITED = {
    "KS_COLLECTOR_RATE_LIMIT_IP": "1000000/minute",
    "KS_COLLECTOR_RATE_LIMIT_CALLBACK": "1000000/minute",
}


def test_four_workers_and_a_relay_writing_at_once_answer_every_beacon_202(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    env = {**UNLIMITED, "KS_COLLECTOR_RELAY_CONCURRENCY": "32"}  # otherwise the defaults
    web = WebProcess(env, workers=4, threads=4, database_url=database_url).start()
    relay = RelayProcess(env, database_url=database_url, upstream_url=mock_kuaishou.url)
    relay.start()

    statuses: list[int] = []
    sessions: list[requests.Session] = []
    local = threading.local()  # keep-alive per client thread, as browsers would

    def send(number: int) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        response = send_beacon(web.url, f"busy-{number:05d}", session=local.session)
        statuses.append(response.status_code)

    with ThreadPoolExecutor(CLIENT_THREADS) as clients:
        list(clients.map(send, range(BEACONS)))
    for session in sessions:
        session.close()
    wait_until(lambda: all_finished(outbox, BEACONS), 60, "every beacon to be delivered")
    relay.terminate()
    web.terminate()

    assert collections.Counter(statuses) == {202: BEACONS}
    assert "database is locked" not in web.log_text() + relay.log_text()
    callbacks = [f"busy-{number:05d}" for number in range(BEACONS)]
    figures = delivery_figures(
        "4 web workers x 4 threads, 20 clients and a relay at once",
        engine_of(database_url),
        callbacks,
        mock_kuaishou,
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (BEACONS, 0, 0)
    assert status_counts(outbox) == {"delivered": BEACONS}


def test_beacons_are_answered_at_once_while_kuaishou_does_not_answer_at_all(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode("hang")  # every call waits out the relay's 10 s timeout
    env = {
        **UNLIMITED,
        **QUICK_RELAY_ENV,
        "KS_COLLECTOR_RELAY_CONCURRENCY": "8",
        "KS_COLLECTOR_UPSTREAM_TIMEOUT_SECONDS": "10",
        "KS_COLLECTOR_LEASE_SECONDS": "30",
    }
    server = CollectorServer(env, database_url=database_url, upstream_url=mock_kuaishou.url)
    server.start()
    session = requests.Session()

    slowest = 0.0
    callbacks = []
    for number in range(200):
        callbacks.append(f"hung-{number:03d}")
        response = send_beacon(server.url, callbacks[-1], session=session)
        assert response.status_code == 202
        slowest = max(slowest, response.elapsed.total_seconds())
    session.close()

    assert slowest < 2.0  # far below the 10 s the relay waits for each answer
    # The relay is stuck on its first eight (all its slots) and the rest wait in the outbox.
    mock_kuaishou.wait_for_requests(8, timeout=20)
    assert len(mock_kuaishou.requests()) == 8
    assert status_counts(outbox) == {"pending": 200}

    # Kuaishou drops the hung calls and comes back healthy: everything goes out once.
    mock_kuaishou.stop()
    mock_kuaishou.set_mode("ok")
    mock_kuaishou.start()
    wait_until(lambda: all_finished(outbox, 200), 30, "every beacon to be delivered")
    figures = delivery_figures(
        "kuaishou not answering while beacons arrive",
        engine_of(database_url),
        callbacks,
        mock_kuaishou,
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (200, 0, 0)
