"""The collector's promise under a failing store: nothing is answered 2xx before it is committed.

When the store cannot commit (locked too long, disk full, database down) a beacon or an API
call is answered 503 with ``Retry-After``; once the store is back, the client's retry with the
same event id stores the event exactly once. A web worker killed mid-request leaves the client
with a failed request and nothing half-stored.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from collector.store import SqlStore
from tests.fault.helpers import (
    API_ENV,
    QUICK_RELAY_ENV,
    all_finished,
    delivery_figures,
    engine_of,
    migrated_store,
    rows_with_event_id,
    send_api_event,
    send_beacon,
    wait_until,
    write_lock_held,
)
from tests.fault.tcp_proxy import TcpProxy
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess, WebProcess, run_cli

# What the collector answers when its store cannot commit (collector/web/__init__.py).
RETRY_AFTER = "2"


def assert_store_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == RETRY_AFTER
    assert response.json()["error"] == "store_unavailable"


def assert_accepted(response: requests.Response, status: str = "accepted") -> None:
    assert response.status_code == 202, response.text
    body = response.json()
    statuses = [item["status"] for item in body["results"]] if "results" in body else None
    assert (statuses or [body["status"]]) == [status]


def deliver_and_count(
    scenario: str, database_url: str, callbacks: list[str], mock: MockKuaishou
) -> None:
    """Run a relay until everything stored is delivered; assert each callback arrived once."""
    store = migrated_store(database_url)
    try:
        with RelayProcess(QUICK_RELAY_ENV, database_url=database_url, upstream_url=mock.url):
            wait_until(lambda: all_finished(store, len(callbacks)), 20, "delivery")
    finally:
        store.close()
    figures = delivery_figures(scenario, engine_of(database_url), callbacks, mock)
    assert (figures.delivered, figures.duplicated, figures.lost) == (len(callbacks), 0, 0)


def in_thread(call: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Start ``call(*args)`` on a thread; the list receives its result or exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call(*args))
        except Exception as error:  # the test inspects it
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_store_locked_past_its_timeout_is_answered_503_and_the_retry_stores_once(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    web = WebProcess(API_ENV, workers=1, threads=4, database_url=database_url).start()
    with write_lock_held(database_url):
        started = time.monotonic()
        beacon, beacon_outcome = in_thread(send_beacon, web.url, "locked-tag", "locked-tag")
        api, api_outcome = in_thread(send_api_event, web.url, "locked-api", "locked-api")
        beacon.join(20)
        api.join(20)
        waited = time.monotonic() - started
    assert_store_unavailable(beacon_outcome[0])
    assert_store_unavailable(api_outcome[0])
    assert waited >= 4.5  # each waited out the 5 s lock timeout before giving up

    assert_accepted(send_beacon(web.url, "locked-tag", "locked-tag"))
    assert_accepted(send_api_event(web.url, "locked-api", "locked-api"))
    assert_accepted(send_beacon(web.url, "locked-tag", "locked-tag"), "duplicate")
    assert rows_with_event_id(outbox, "tag:locked-tag") == 1
    assert rows_with_event_id(outbox, "locked-api") == 1
    deliver_and_count(
        "store locked past its timeout: 503, client retries",
        database_url,
        ["locked-tag", "locked-api"],
        mock_kuaishou,
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs to fill up (needs root, as the test machines and CI run)."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs to fill (run as root): {mounted.stderr.strip()}")
    yield mount_point
    # Lazy: the collector under test may still hold files there until the harness kills it.
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full."""
    # Unbuffered: a buffered file would keep the bytes that did not fit and raise ENOSPC
    # again when closed.
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_sqlite_on_a_full_disk_is_answered_503_and_the_retry_stores_once(
    tiny_disk: Path, mock_kuaishou: MockKuaishou
) -> None:
    database_url = f"sqlite:///{tiny_disk / 'ks-collector.db'}"
    run_cli(["migrate"], database_url=database_url)
    web = WebProcess(API_ENV, workers=1, threads=2, database_url=database_url).start()
    assert_accepted(send_beacon(web.url, "before-full", "before-full"))

    fill_disk(tiny_disk / "filler")
    assert_store_unavailable(send_beacon(web.url, "disk-full", "disk-full"))
    assert_store_unavailable(send_api_event(web.url, "disk-full-api", "disk-full-api"))
    assert "database or disk is full" in web.log_text()

    (tiny_disk / "filler").unlink()
    assert_accepted(send_beacon(web.url, "disk-full", "disk-full"))
    assert_accepted(send_api_event(web.url, "disk-full-api", "disk-full-api"))
    store = migrated_store(database_url)
    try:
        for event_id in ("tag:before-full", "tag:disk-full", "disk-full-api"):
            assert rows_with_event_id(store, event_id) == 1
    finally:
        store.close()
    deliver_and_count(
        "SQLite disk full: 503, client retries",
        database_url,
        ["before-full", "disk-full", "disk-full-api"],
        mock_kuaishou,
    )


def test_postgresql_down_is_answered_503_until_it_is_back_and_the_retry_stores_once(
    postgres_url: str, mock_kuaishou: MockKuaishou
) -> None:
    run_cli(["migrate"], database_url=postgres_url)
    proxy = TcpProxy.in_front_of(postgres_url).start()
    web = WebProcess(API_ENV, workers=1, threads=2, database_url=proxy.url_for(postgres_url))
    web.start()
    assert_accepted(send_beacon(web.url, "before-down", "before-down"))

    proxy.stop()
    assert_store_unavailable(send_beacon(web.url, "pg-down", "pg-down"))
    assert_store_unavailable(send_api_event(web.url, "pg-down-api", "pg-down-api"))

    proxy.start()
    # As a client would: retry after the pause the collector asked for, until it commits.
    answers = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        answers.append(send_beacon(web.url, "pg-down", "pg-down"))
        if answers[-1].status_code != 503:
            break
        time.sleep(float(answers[-1].headers["Retry-After"]))
    *refused, final = answers
    for response in refused:
        assert_store_unavailable(response)
    assert_accepted(final)
    assert_accepted(send_api_event(web.url, "pg-down-api", "pg-down-api"))
    store = migrated_store(postgres_url)
    try:
        for event_id in ("tag:before-down", "tag:pg-down", "pg-down-api"):
            assert rows_with_event_id(store, event_id) == 1
    finally:
        store.close()
    proxy.stop()
    deliver_and_count(
        "PostgreSQL down: 503, client retries",
        postgres_url,
        ["before-down", "pg-down", "pg-down-api"],
        mock_kuaishou,
    )


def test_worker_killed_mid_request_fails_the_request_and_the_retry_stores_once(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    web = WebProcess(workers=1, threads=2, database_url=database_url).start()
    [worker] = web.wait_for_workers(1)
    with write_lock_held(database_url):
        request, outcome = in_thread(send_beacon, web.url, "cut-short", "cut-short-id")
        # The worker is now waiting for the store's lock (up to 5 s): kill it there.
        time.sleep(0.5)
        assert request.is_alive()
        os.kill(worker, signal.SIGKILL)
        request.join(10)
    assert isinstance(outcome[0], requests.ConnectionError)

    wait_until(lambda: web.worker_pids() and web.worker_pids() != [worker], 20, "a new worker")
    assert_accepted(send_beacon(web.url, "cut-short", "cut-short-id"))
    assert_accepted(send_beacon(web.url, "cut-short", "cut-short-id"), "duplicate")
    assert rows_with_event_id(outbox, "tag:cut-short-id") == 1

    with RelayProcess(QUICK_RELAY_ENV, database_url=database_url, upstream_url=mock_kuaishou.url):
        wait_until(lambda: all_finished(outbox, 1), 20, "the event to be delivered")
    figures = delivery_figures(
        "web worker SIGKILLed mid-request, client retries",
        engine_of(database_url),
        ["cut-short"],
        mock_kuaishou,
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (1, 0, 0)
