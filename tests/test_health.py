"""/healthz (the process answers) and /readyz (the store takes a write and a relay reported in).

The two states a load balancer sees in practice are tested with real processes: ``ks-collector
web`` alone, with no relay anywhere, is not ready; ``ks-collector serve`` is. The rarer states
(a stale heartbeat, a locked store) are set up in-process against a real SQLite store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from collector.config import Config
from collector.store import open_store, sqlite
from collector.validation import now_ms
from collector.web import create_app, pages
from tests.support.processes import CollectorServer, WebProcess, run_cli


def get(url: str) -> tuple[int, dict, str]:
    """(status, JSON body, Cache-Control) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response), response.headers["Cache-Control"]
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), error.headers["Cache-Control"]


def test_healthz_answers_ok_without_a_relay(sqlite_url):
    run_cli(["migrate"], database_url=sqlite_url)
    with WebProcess(workers=1, database_url=sqlite_url) as web:
        assert get(web.url + "/healthz") == (200, {"status": "ok"}, "no-store")


def test_web_alone_is_not_ready_for_want_of_a_relay_heartbeat(sqlite_url):
    run_cli(["migrate"], database_url=sqlite_url)
    with WebProcess(workers=1, database_url=sqlite_url) as web:
        status, body, cache = get(web.url + "/readyz")

    assert (status, cache) == (503, "no-store")
    assert body == {
        "status": "not ready",
        "checks": {
            "store": "ok",
            "relay": "no relay heartbeat yet: is a relay running against this store?",
        },
    }


def test_serve_is_ready_once_its_relay_reports_in(sqlite_url):
    with CollectorServer(workers=1, database_url=sqlite_url) as server:
        deadline = time.monotonic() + 15
        while (answer := get(server.url + "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, f"never ready: {answer}"
            time.sleep(0.1)

    assert answer == (
        200,
        {"status": "ready", "checks": {"store": "ok", "relay": "ok"}},
        "no-store",
    )


@pytest.fixture
def app(sqlite_url, monkeypatch):
    # A locked store answers after the busy timeout; a short one keeps the test quick.
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 200)
    store = open_store(sqlite_url)
    store.migrate()
    yield create_app(Config.from_env({}, database_url=sqlite_url), store).test_client(), store
    store.close()


def test_a_heartbeat_older_than_thirty_seconds_is_not_ready(app):
    client, store = app
    store.beat("relay-1", now_ms() - pages.RELAY_HEARTBEAT_STALE_MS - 1000)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["checks"]["relay"] == "no relay heartbeat in the last 30 s"


def test_a_fresh_heartbeat_from_any_relay_is_ready(app):
    client, store = app
    store.beat("relay-old", now_ms() - 3_600_000)
    store.beat("relay-new", now_ms() - 2_000)

    assert client.get("/readyz").status_code == 200


def test_a_store_that_cannot_take_a_write_is_not_ready(app, sqlite_url):
    client, store = app
    store.beat("relay-1", now_ms())
    blocker = sqlite3.connect(sqlite.path_from_url(sqlite_url), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = client.get("/readyz")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert response.status_code == 503
    checks = response.get_json()["checks"]
    assert checks["store"].startswith("unavailable: SQLite could not start a transaction:")
    assert checks["relay"] == "unknown"
    assert client.get("/readyz").status_code == 200


@contextmanager
def read_only(path: str) -> Iterator[None]:
    """Make the file unwritable as a wrong owner would: chattr +i for root, whom permission
    bits do not stop, else chmod."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", path], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
        return
    os.chmod(path, 0o444)
    try:
        yield
    finally:
        os.chmod(path, 0o644)


def test_a_store_started_read_only_is_not_ready(sqlite_url):
    # As after a command run as root made the database root's: connections open it read-only,
    # and a transaction that writes nothing still commits.
    migrated = open_store(sqlite_url)
    migrated.migrate()
    migrated.beat("relay-1", now_ms())
    migrated.close()
    store = open_store(sqlite_url)
    client = create_app(Config.from_env({}, database_url=sqlite_url), store).test_client()

    with read_only(sqlite.path_from_url(sqlite_url)):
        response = client.get("/readyz")
        beacon = client.post("/collect", data=b'{"v":1,"id":"ro-1","type":"form","callback":"C"}')

    assert response.status_code == 503
    assert response.get_json()["checks"]["store"] == (
        "unavailable: SQLite could not commit: attempt to write a readonly database"
    )
    assert beacon.status_code == 503
    # Writable again: the same process takes writes without a restart.
    assert client.get("/readyz").status_code == 200
    store.close()
