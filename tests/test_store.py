"""The outbox on both engines: intake, leases, attempts, dead letters, and failing to commit.

Every test runs on SQLite and on PostgreSQL (``database_url``) unless it is about one engine.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from collector.store import (
    AttemptResult,
    DueEvent,
    Outcome,
    SqlStore,
    StoreUnavailable,
    open_store,
)
from collector.store import postgres as postgres_store
from collector.store import sqlite as sqlite_store
from collector.validation import Conversion, now_ms
from tests.fault.helpers import query, write_lock_held
from tests.support.processes import free_port, run_cli

LEASE_MS = 60_000
FORM, REGISTRATION = 9, 2


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    store = open_store(database_url)
    store.migrate()
    yield store
    store.close()


def conversion(
    callback: str = "CLICK-1",
    *,
    event_type: int = FORM,
    event_id: str | None = None,
    received_at_ms: int | None = None,
) -> Conversion:
    received = now_ms() if received_at_ms is None else received_at_ms
    return Conversion(
        event_type=event_type,
        callback=callback,
        event_time_ms=received,
        received_at_ms=received,
        source="api",
        event_id=event_id or f"id-{callback}",
    )


def attempt(
    event: DueEvent,
    outcome: Outcome,
    *,
    at_ms: int | None = None,
    http_status: int | None = 200,
    response: str | None = '{"result":1}',
    error: str | None = None,
    next_attempt_at_ms: int | None = None,
    dead: bool = False,
) -> AttemptResult:
    return AttemptResult(
        event,
        outcome,
        now_ms() if at_ms is None else at_ms,
        25,
        http_status,
        response,
        error,
        next_attempt_at_ms,
        dead,
    )


def event_row(store: SqlStore, event_pk: int) -> dict:
    [row] = [row for row in store.list_events(limit=1000) if row["id"] == event_pk]
    return row


# ---- intake ------------------------------------------------------------------------------------


def test_committed_conversion_is_pending_and_due_at_once(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion("CLICK-1")], frozenset())

    row = event_row(store, accepted.id)
    assert accepted.status == "accepted"
    assert (row["status"], row["attempts"], row["callback"]) == ("pending", 0, "CLICK-1")
    assert row["next_attempt_at_ms"] == row["received_at_ms"]


def test_known_event_id_is_answered_duplicate_and_stored_once(store: SqlStore) -> None:
    [first] = store.add_conversions([conversion("A", event_id="same")], frozenset())
    [again] = store.add_conversions([conversion("B", event_id="same")], frozenset())

    assert (again.status, again.id, again.event_id) == ("duplicate", first.id, "same")
    assert query(store, "SELECT COUNT(*) FROM events") == [(1,)]


def test_once_per_click_event_is_stored_once_per_callback(store: SqlStore) -> None:
    once = frozenset({REGISTRATION})
    results = store.add_conversions(
        [
            conversion("A", event_type=REGISTRATION, event_id="r1"),
            conversion("A", event_type=REGISTRATION, event_id="r2"),
            conversion("B", event_type=REGISTRATION, event_id="r3"),
        ],
        once,
    )

    assert [result.status for result in results] == ["accepted", "duplicate", "accepted"]
    assert results[1].id == results[0].id


# ---- claiming and leases -----------------------------------------------------------------------


def test_claim_leases_due_events_oldest_due_first_up_to_the_limit(store: SqlStore) -> None:
    now = now_ms()
    for number in range(5):
        store.add_conversions(
            [conversion(f"C{number}", received_at_ms=now - 1000 + number)], frozenset()
        )

    claimed = store.claim_due("relay-a", 3, now, LEASE_MS)

    assert [event.callback for event in claimed] == ["C0", "C1", "C2"]
    assert [event.attempts for event in claimed] == [1, 1, 1]
    leases = query(
        store, "SELECT lease_owner, lease_until_ms FROM events WHERE lease_owner IS NOT NULL"
    )
    assert sorted(leases) == [("relay-a", now + LEASE_MS)] * 3


def test_leased_event_is_not_claimed_again_until_its_lease_expires(store: SqlStore) -> None:
    store.add_conversions([conversion()], frozenset())
    now = now_ms()
    [first] = store.claim_due("relay-a", 10, now, LEASE_MS)

    assert store.claim_due("relay-b", 10, now + LEASE_MS - 1, LEASE_MS) == []
    [again] = store.claim_due("relay-b", 10, now + LEASE_MS + 1, LEASE_MS)
    assert (again.id, again.attempts) == (first.id, 2)


def test_event_scheduled_later_is_not_claimed_before_its_time(store: SqlStore) -> None:
    store.add_conversions([conversion()], frozenset())
    now = now_ms()
    [event] = store.claim_due("relay-a", 10, now, LEASE_MS)
    store.record_attempts(
        "relay-a",
        [attempt(event, Outcome.TRANSIENT, http_status=503, next_attempt_at_ms=now + 5000)],
    )

    assert store.claim_due("relay-a", 10, now + 4999, LEASE_MS) == []
    assert len(store.claim_due("relay-a", 10, now + 5000, LEASE_MS)) == 1


def test_concurrent_claims_never_hand_one_event_to_two_relays(database_url: str) -> None:
    setup = open_store(database_url)
    setup.migrate()
    setup.add_conversions([conversion(f"C{n}") for n in range(200)], frozenset())
    setup.close()
    claimed: dict[str, list[int]] = {}

    def claim_all(owner: str) -> None:
        store = open_store(database_url)
        mine: list[int] = []
        while batch := store.claim_due(owner, 7, now_ms(), LEASE_MS):
            mine += [event.id for event in batch]
        claimed[owner] = mine
        store.close()

    threads = [threading.Thread(target=claim_all, args=(f"relay-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    every_claim = [event_id for ids in claimed.values() for event_id in ids]
    assert len(every_claim) == 200
    assert len(set(every_claim)) == 200


def test_release_leases_frees_only_that_relays_pending_events(store: SqlStore) -> None:
    store.add_conversions([conversion("A"), conversion("B")], frozenset())
    now = now_ms()
    [event_a] = store.claim_due("relay-a", 1, now, LEASE_MS)
    store.claim_due("relay-b", 1, now, LEASE_MS)

    assert store.release_leases("relay-a") == 1
    assert query(store, "SELECT callback, lease_owner FROM events ORDER BY callback") == [
        (event_a.callback, None),
        ("B", "relay-b"),
    ]


# ---- recording attempts ------------------------------------------------------------------------


def test_delivered_attempt_finishes_the_event_and_keeps_time_status_body_and_latency(
    store: SqlStore,
) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)
    at = now_ms()

    store.record_attempts("relay-a", [attempt(event, Outcome.DELIVERED, at_ms=at)])

    row = event_row(store, accepted.id)
    assert (row["status"], row["finished_at_ms"], row["lease_owner"]) == ("delivered", at, None)
    assert store.attempts_of(accepted.id) == [
        {
            "at_ms": at,
            "relay": "relay-a",
            "outcome": "delivered",
            "http_status": 200,
            "latency_ms": 25,
            "response": '{"result":1}',
            "error": None,
        }
    ]


def test_rejected_attempt_is_final(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)
    body = '{"result":0,"error_msg":"callbackinfo decodedfailure"}'

    store.record_attempts(
        "relay-a",
        [attempt(event, Outcome.REJECTED, response=body, error="callbackinfo decodedfailure")],
    )

    row = event_row(store, accepted.id)
    assert (row["status"], row["last_error"], row["last_response"]) == (
        "rejected",
        "callbackinfo decodedfailure",
        body,
    )
    assert store.claim_due("relay-a", 1, now_ms() + 10**9, LEASE_MS) == []


def test_transient_attempt_stores_the_retry_time_and_frees_the_lease(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)
    retry_at = now_ms() + 30_000

    store.record_attempts(
        "relay-a",
        [
            attempt(
                event,
                Outcome.TRANSIENT,
                http_status=503,
                response="busy",
                error="HTTP 503",
                next_attempt_at_ms=retry_at,
            )
        ],
    )

    row = event_row(store, accepted.id)
    assert (row["status"], row["next_attempt_at_ms"], row["lease_owner"]) == (
        "pending",
        retry_at,
        None,
    )
    assert (row["last_http_status"], row["last_error"]) == (503, "HTTP 503")


def test_transient_attempt_past_the_retry_age_makes_the_event_dead(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)

    store.record_attempts(
        "relay-a",
        [attempt(event, Outcome.TRANSIENT, http_status=None, error="timeout", dead=True)],
    )

    row = event_row(store, accepted.id)
    assert (row["status"], row["last_error"]) == ("dead", "timeout")
    assert store.claim_due("relay-a", 1, now_ms() + 10**9, LEASE_MS) == []


def test_transient_attempt_of_a_relay_whose_lease_was_taken_over_does_not_reschedule(
    store: SqlStore,
) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    now = now_ms()
    [slow] = store.claim_due("relay-a", 1, now, LEASE_MS)
    store.claim_due("relay-b", 1, now + LEASE_MS + 1, LEASE_MS)

    store.record_attempts(
        "relay-a", [attempt(slow, Outcome.TRANSIENT, next_attempt_at_ms=now + 10**8)]
    )

    row = event_row(store, accepted.id)
    assert (row["lease_owner"], row["status"]) == ("relay-b", "pending")
    assert len(store.attempts_of(accepted.id)) == 1  # the try itself is still on record


def test_final_answer_is_recorded_even_after_the_lease_moved_on(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    now = now_ms()
    [slow] = store.claim_due("relay-a", 1, now, LEASE_MS)
    store.claim_due("relay-b", 1, now + LEASE_MS + 1, LEASE_MS)

    store.record_attempts("relay-a", [attempt(slow, Outcome.DELIVERED)])

    assert event_row(store, accepted.id)["status"] == "delivered"


def test_answer_with_nul_characters_is_recorded(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)

    store.record_attempts(
        "relay-a",
        [attempt(event, Outcome.REJECTED, response="bin\x00ary", error="bad\x00answer")],
    )

    [recorded] = store.attempts_of(accepted.id)
    assert recorded["response"] == "bin\N{REPLACEMENT CHARACTER}ary"
    assert recorded["error"] == "bad\N{REPLACEMENT CHARACTER}answer"


def test_answer_is_kept_as_an_excerpt(store: SqlStore) -> None:
    [accepted] = store.add_conversions([conversion()], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)

    store.record_attempts("relay-a", [attempt(event, Outcome.REJECTED, response="x" * 10_000)])

    assert store.attempts_of(accepted.id)[0]["response"] == "x" * 500


# ---- operations --------------------------------------------------------------------------------


def finished(store: SqlStore, callback: str, outcome: Outcome, *, error: str | None = None) -> int:
    [accepted] = store.add_conversions([conversion(callback)], frozenset())
    [event] = store.claim_due("relay-a", 1, now_ms(), LEASE_MS)
    dead = outcome is Outcome.TRANSIENT
    store.record_attempts("relay-a", [attempt(event, outcome, error=error, dead=dead)])
    return accepted.id


def test_requeue_sends_dead_and_rejected_events_again_with_a_fresh_backoff(
    store: SqlStore,
) -> None:
    dead = finished(store, "DEAD", Outcome.TRANSIENT, error="HTTP 503")
    rejected = finished(store, "REJ", Outcome.REJECTED, error="callbackinfo decodedfailure")
    delivered = finished(store, "OK", Outcome.DELIVERED)
    now = now_ms()

    assert store.requeue(now, ids=[dead, rejected, delivered]) == 2

    for event_pk in (dead, rejected):
        row = event_row(store, event_pk)
        assert (row["status"], row["attempts"], row["next_attempt_at_ms"]) == ("pending", 0, now)
    assert event_row(store, delivered)["status"] == "delivered"
    [again] = [event for event in store.claim_due("r", 10, now, LEASE_MS) if event.id == dead]
    assert (again.attempts, again.age_base_ms) == (1, now)  # the retry age restarts too


def test_requeue_by_error_text_ignores_case_and_takes_wildcards_literally(
    store: SqlStore,
) -> None:
    finished(store, "A", Outcome.REJECTED, error="callbackinfo decodedfailure")
    finished(store, "B", Outcome.TRANSIENT, error="HTTP 503")
    finished(store, "C", Outcome.TRANSIENT, error="100% broken_pipe")

    assert store.requeue(now_ms(), error_contains="%") == 1
    assert store.requeue(now_ms(), error_contains="http_503") == 0
    assert store.requeue(now_ms(), error_contains="DECODEDfailure") == 1


def test_purge_deletes_delivered_events_and_their_attempts_only(store: SqlStore) -> None:
    delivered = finished(store, "OK", Outcome.DELIVERED)
    rejected = finished(store, "REJ", Outcome.REJECTED, error="x")

    assert store.purge_delivered(now_ms() + 1) == 1

    assert [row["id"] for row in store.list_events()] == [rejected]
    assert store.attempts_of(delivered) == []
    assert len(store.attempts_of(rejected)) == 1


def test_purge_works_through_many_events_in_batches(store: SqlStore) -> None:
    for number in range(5):
        finished(store, f"OK{number}", Outcome.DELIVERED)

    assert store.purge_delivered(now_ms() + 1, batch_size=2) == 5
    assert store.list_events() == []


def test_migrating_again_applies_nothing(store: SqlStore) -> None:
    assert store.migrate() == []


# ---- failing to commit -------------------------------------------------------------------------


def test_sqlite_write_waits_for_a_brief_lock(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    store.migrate()
    released = threading.Event()

    def release_soon() -> None:
        time.sleep(0.3)
        released.set()

    with write_lock_held(sqlite_url):
        threading.Thread(target=release_soon).start()
        released.wait()
    [accepted] = store.add_conversions([conversion()], frozenset())
    assert accepted.status == "accepted"
    store.close()


def test_sqlite_locked_past_the_busy_timeout_raises_store_unavailable(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 300)
    store = open_store(sqlite_url)
    store.migrate()

    with write_lock_held(sqlite_url), pytest.raises(StoreUnavailable, match="locked"):
        store.add_conversions([conversion()], frozenset())
    assert query(store, "SELECT COUNT(*) FROM events") == [(0,)]
    store.close()


def test_postgresql_locked_past_the_lock_timeout_raises_store_unavailable(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_store, "LOCK_TIMEOUT_MS", 300)
    store = open_store(postgres_url)
    store.migrate()

    with write_lock_held(postgres_url), pytest.raises(StoreUnavailable, match="lock timeout"):
        store.add_conversions([conversion()], frozenset())
    assert query(store, "SELECT COUNT(*) FROM events") == [(0,)]
    store.close()


def test_postgresql_that_cannot_be_reached_raises_store_unavailable() -> None:
    closed_port = free_port()
    store = postgres_store.PostgresStore(
        f"postgresql://postgres@127.0.0.1:{closed_port}/none", timeout=0.5
    )

    with pytest.raises(StoreUnavailable):
        store.add_conversions([conversion()], frozenset())
    store.close()


# ---- found by an adversarial review -------------------------------------------------------

ONCE = frozenset({FORM})


def test_a_lead_id_stays_with_the_first_click_that_reported_it(store: SqlStore) -> None:
    visitor = dataclasses.replace(conversion("VICTIM"), source="tag", lead_id="L-1042")
    forger = dataclasses.replace(
        conversion("ATTACKER", event_id="forged"), source="tag", lead_id="L-1042"
    )

    store.add_conversions([visitor], ONCE)
    store.add_conversions([forger], ONCE)

    assert store.resolve_leads(["L-1042"]) == {"L-1042": "VICTIM"}


def test_batches_sharing_once_per_click_keys_in_opposite_orders_never_deadlock(
    store: SqlStore,
) -> None:
    def batch(round_number: int, reverse: bool) -> int:
        events = [
            conversion(f"SHARED-{n}", event_id=f"r{round_number}-{reverse}-{n}") for n in range(40)
        ]
        results = store.add_conversions(events[::-1] if reverse else events, ONCE)
        return len(results)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batch, n, n % 2 == 1) for n in range(40)]
        answered = [future.result() for future in futures]  # a deadlock raises StoreUnavailable

    assert answered == [40] * 40
    assert store.count_status("pending") == 40
    assert not any(isinstance(future.exception(), StoreUnavailable) for future in futures)


def test_batch_answers_keep_the_callers_order(store: SqlStore) -> None:
    events = [conversion(f"ORDER-{n}", event_id=f"order-{n}") for n in (3, 1, 2)]

    results = store.add_conversions(events, ONCE)

    assert [result.event_id for result in results] == ["order-3", "order-1", "order-2"]


def test_ids_are_never_reused_after_a_purge(store: SqlStore) -> None:
    [first] = store.add_conversions([conversion("PURGED")], ONCE)
    [due] = store.claim_due("relay-1", 10, now_ms(), LEASE_MS)
    store.record_attempts("relay-1", [attempt(due, Outcome.DELIVERED)])
    assert store.purge_delivered(now_ms() + 1) == 1

    [second] = store.add_conversions([conversion("NEXT")], ONCE)

    assert second.id > first.id


def test_purge_refuses_ages_within_the_api_event_age(sqlite_url: str) -> None:
    run_cli(["migrate"], database_url=sqlite_url)

    result = run_cli(["purge", "--older-than", "1d"], database_url=sqlite_url, check=False)

    assert result.returncode == 2
    assert "younger than KS_COLLECTOR_MAX_EVENT_AGE_DAYS (7 days)" in result.stderr
