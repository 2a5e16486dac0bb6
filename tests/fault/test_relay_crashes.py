"""Relays dying and stopping: at least once, duplicates only for requests in flight at a crash.

A relay SIGKILLed mid-flight leaves leases that expire; the next relay takes those events and
sends them again. A relay told to stop (SIGTERM) claims nothing more, waits for its requests,
records them and exits cleanly.
"""

from __future__ import annotations

from collector.store import SqlStore
from tests.fault.helpers import (
    QUICK_RELAY_ENV,
    all_finished,
    delivery_figures,
    engine_of,
    form_conversions,
    query,
    queue_conversions,
    status_counts,
    wait_until,
)
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess

KILLS = 10
EVENTS_PER_ROUND = 200  # 2,000 events over the ten kills
# A short lease so that events of a killed relay are free again quickly.
CRASH_ENV = {**QUICK_RELAY_ENV, "KS_COLLECTOR_LEASE_SECONDS": "2"}


def leased_and_unrecorded(store: SqlStore, relay: RelayProcess) -> int:
    """Events ``relay`` claimed and did not record: its requests in flight when it died."""
    [(count,)] = query(
        store,
        "SELECT COUNT(*) FROM events WHERE status = 'pending' AND lease_owner LIKE ?",
        (f"%:{relay.pid}:%",),  # relay names are host:pid:random
    )
    return count


def test_relay_killed_ten_times_loses_nothing_and_repeats_only_requests_in_flight(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode(latency_ms=20)  # requests take long enough to be cut in flight
    sent: list[str] = []
    in_flight_at_kills = 0
    for round_number in range(KILLS):
        start = round_number * EVENTS_PER_ROUND
        sent += queue_conversions(outbox, form_conversions("crash", EVENTS_PER_ROUND, start=start))
        relay = RelayProcess(CRASH_ENV, database_url=database_url, upstream_url=mock_kuaishou.url)
        relay.start()
        calls_before = mock_kuaishou.stats()["count"]
        wait_until(
            lambda before=calls_before: mock_kuaishou.stats()["count"] >= before + 60,
            30,
            f"relay {round_number + 1} to be sending",
        )
        relay.kill()
        in_flight_at_kills += leased_and_unrecorded(outbox, relay)

    with RelayProcess(CRASH_ENV, database_url=database_url, upstream_url=mock_kuaishou.url):
        wait_until(lambda: all_finished(outbox, len(sent)), 60, "every event to be delivered")

    figures = delivery_figures(
        f"relay SIGKILLed {KILLS} times",
        engine_of(database_url),
        sent,
        mock_kuaishou,
        in_flight_at_crashes=in_flight_at_kills,
    )
    assert (figures.sent, figures.delivered, figures.lost) == (2000, 2000, 0)
    assert status_counts(outbox) == {"delivered": 2000}
    assert in_flight_at_kills > 0, "every kill found the relay idle: the test proves nothing"
    assert figures.duplicated <= in_flight_at_kills


def test_relay_stopped_with_sigterm_finishes_its_requests_and_claims_no_more(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode(latency_ms=600)  # within the 1 s upstream timeout
    callbacks = queue_conversions(outbox, form_conversions("sigterm", 10))
    env = {**QUICK_RELAY_ENV, "KS_COLLECTOR_RELAY_CONCURRENCY": "4"}
    relay = RelayProcess(env, database_url=database_url, upstream_url=mock_kuaishou.url)
    relay.start()
    mock_kuaishou.wait_for_requests(4, timeout=20)

    assert relay.terminate() == 0
    # The four in flight were answered and recorded; the other six were never claimed.
    assert len(mock_kuaishou.requests()) == 4
    assert status_counts(outbox) == {"delivered": 4, "pending": 6}
    assert query(outbox, "SELECT COUNT(*) FROM events WHERE lease_owner IS NOT NULL") == [(0,)]
    assert query(outbox, "SELECT attempts FROM events WHERE status = 'pending'") == [(0,)] * 6

    mock_kuaishou.set_mode(latency_ms=0)
    with RelayProcess(env, database_url=database_url, upstream_url=mock_kuaishou.url):
        wait_until(lambda: all_finished(outbox, 10), 20, "the other six to be delivered")
    figures = delivery_figures(
        "relay stopped with SIGTERM mid-flight", engine_of(database_url), callbacks, mock_kuaishou
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (10, 0, 0)
