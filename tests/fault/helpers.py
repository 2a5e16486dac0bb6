"""What the fault scenarios share: quick relay settings, filling the outbox, reading it back,
counting what the mock Kuaishou received, and the figures file.
"""

from __future__ import annotations

import collections
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from collector.store import SqlStore, open_store
from collector.store.sqlite import path_from_url
from collector.validation import Conversion, now_ms
from tests.support.mock_kuaishou import TRACK_PATH, MockKuaishou

# Where every scenario's one-line figure goes, for the README (the directory is gitignored).
FIGURES_PATH = Path(__file__).resolve().parents[2] / "test-output" / "fault-figures.json"

# A relay tuned for tests: short polls, retries within a second, a one-second upstream timeout.
QUICK_RELAY_ENV = {
    "KS_COLLECTOR_RELAY_POLL_SECONDS": "0.05",
    "KS_COLLECTOR_RETRY_BASE_SECONDS": "0.2",
    "KS_COLLECTOR_RETRY_MAX_DELAY_SECONDS": "1",
    "KS_COLLECTOR_UPSTREAM_TIMEOUT_SECONDS": "1",
    "KS_COLLECTOR_LEASE_SECONDS": "5",
    "KS_COLLECTOR_RELAY_CONCURRENCY": "16",
}

# Form submitted: a browser-safe type without parameters (each test uses fresh callbacks).
FORM = 9

# A server API token for collectors started by these tests.
API_TOKEN = "fault-tests-token-0123456789"
API_ENV = {"KS_COLLECTOR_API_TOKENS": f"fault:{API_TOKEN}"}

T = TypeVar("T")


def engine_of(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite:") else "postgresql"


def migrated_store(database_url: str) -> SqlStore:
    """An in-process store on the test's database, schema applied, for filling and reading."""
    store = open_store(database_url)
    store.migrate()
    return store


def form_conversions(prefix: str, count: int, *, start: int = 0) -> list[Conversion]:
    """``count`` form conversions with callbacks ``{prefix}-00000`` … and event ids alike."""
    received = now_ms()
    return [
        Conversion(
            event_type=FORM,
            callback=f"{prefix}-{number:05d}",
            event_time_ms=received,
            received_at_ms=received,
            source="api",
            event_id=f"{prefix}-{number:05d}",
        )
        for number in range(start, start + count)
    ]


def queue_conversions(store: SqlStore, conversions: Sequence[Conversion]) -> list[str]:
    """Commit conversions to the outbox; returns their callbacks."""
    results = store.add_conversions(conversions, frozenset())
    assert [result.status for result in results] == ["accepted"] * len(conversions)
    return [conversion.callback or "" for conversion in conversions]


def send_beacon(
    collector_url: str,
    callback: str,
    event_id: str | None = None,
    *,
    session: requests.Session | None = None,
    timeout: float = 30,
) -> requests.Response:
    """POST one tag beacon (a form conversion) to ``/collect``, as static/tag.js does."""
    body = {"v": 1, "id": event_id or uuid.uuid4().hex, "type": "form", "callback": callback}
    return (session or requests).post(
        f"{collector_url}/collect",
        data=json.dumps(body),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        timeout=timeout,
    )


def send_api_event(
    collector_url: str, callback: str, event_id: str, *, timeout: float = 30
) -> requests.Response:
    """POST one registration to ``/api/v1/conversions``, as an advertiser's server does."""
    return requests.post(
        f"{collector_url}/api/v1/conversions",
        json={"event_type": "registration", "callback": callback, "event_id": event_id},
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=timeout,
    )


@contextlib.contextmanager
def write_lock_held(database_url: str) -> Iterator[None]:
    """Hold the events table's write lock from outside the collector until the block ends.

    SQLite: a ``BEGIN IMMEDIATE`` transaction on the file. PostgreSQL: ``LOCK TABLE events IN
    EXCLUSIVE MODE``, which lets reads through and makes every insert or update wait.
    """
    if database_url.startswith("sqlite:"):
        connection = sqlite3.connect(path_from_url(database_url), isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return
    import psycopg

    with psycopg.connect(database_url) as connection:
        connection.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        yield
        connection.rollback()


def wait_until(condition: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def query(store: SqlStore, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with store.reading() as cursor:
        cursor.execute(store.sql(sql), tuple(args))
        return [tuple(row) for row in cursor.fetchall()]


def rows_with_event_id(store: SqlStore, event_id: str) -> int:
    """Rows stored under ``event_id`` (a beacon's id is stored as ``tag:<id>``)."""
    [(count,)] = query(store, "SELECT COUNT(*) FROM events WHERE event_id = ?", (event_id,))
    return count


def status_counts(store: SqlStore) -> dict[str, int]:
    return dict(query(store, "SELECT status, COUNT(*) FROM events GROUP BY status"))


def all_finished(store: SqlStore, total: int) -> bool:
    """True once ``total`` events exist and none is pending."""
    counts = status_counts(store)
    return sum(counts.values()) == total and counts.get("pending", 0) == 0


def attempts_by_callback(store: SqlStore) -> dict[str, list[dict[str, Any]]]:
    """Every recorded attempt, oldest first, per callback."""
    rows = query(
        store,
        "SELECT e.callback, a.outcome, a.http_status, a.latency_ms, a.response, a.error, a.at_ms"
        " FROM attempts a JOIN events e ON e.id = a.event_pk ORDER BY a.id",
    )
    names = ("outcome", "http_status", "latency_ms", "response", "error", "at_ms")
    found: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for callback, *values in rows:
        found[callback].append(dict(zip(names, values, strict=True)))
    return dict(found)


def accepted_by_mock(mock: MockKuaishou) -> collections.Counter[str]:
    """How many times the mock answered success for each callback."""
    return collections.Counter(
        call["params"]["callback"][0]
        for call in mock.requests()
        if call["path"] == TRACK_PATH and call["outcome"] == "ok"
    )


@dataclass(frozen=True)
class Figures:
    """One scenario's outcome, as the README reports it."""

    scenario: str
    engine: str
    sent: int
    delivered: int
    duplicated: int
    lost: int
    # Requests the crashed processes had in flight: the most duplicates there may be.
    in_flight_at_crashes: int | None = None

    @property
    def line(self) -> str:
        line = (
            f"{self.scenario} [{self.engine}]: sent {self.sent}, delivered {self.delivered}, "
            f"duplicated {self.duplicated}, lost {self.lost}"
        )
        if self.in_flight_at_crashes is not None:
            line += f" (in flight at the crashes: {self.in_flight_at_crashes})"
        return line


def delivery_figures(
    scenario: str,
    engine: str,
    sent: Iterable[str],
    mock: MockKuaishou,
    in_flight_at_crashes: int | None = None,
) -> Figures:
    """Count what the mock accepted for the ``sent`` callbacks, print and save the figure.

    delivered: callbacks Kuaishou accepted at least once; duplicated: acceptances beyond the
    first; lost: sent callbacks never accepted.
    """
    sent = list(sent)
    accepted = accepted_by_mock(mock)
    delivered = sum(1 for callback in sent if accepted[callback] > 0)
    duplicated = sum(accepted[callback] - 1 for callback in sent if accepted[callback] > 1)
    lost = len(sent) - delivered
    figures = Figures(
        scenario, engine, len(sent), delivered, duplicated, lost, in_flight_at_crashes
    )
    save_figures(figures)
    return figures


def save_figures(figures: Figures) -> None:
    """Print the figure line and merge it into the figures file (one entry per scenario)."""
    print(figures.line)
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads(FIGURES_PATH.read_text())
    except (OSError, ValueError):
        saved = {}
    saved[f"{figures.scenario} [{figures.engine}]"] = {**asdict(figures), "line": figures.line}
    FIGURES_PATH.write_text(json.dumps(dict(sorted(saved.items())), indent=2) + "\n")
