"""Dead letters and the operator's tools: ``ks-collector replay`` and ``ks-collector purge``.

An event that keeps failing transiently past ``KS_COLLECTOR_RETRY_MAX_AGE_HOURS`` is marked
dead, never deleted; ``replay`` sends chosen dead or rejected events again and says how many;
``purge`` deletes delivered events (only those) older than a duration.
"""

from __future__ import annotations

import time

from collector.store import AttemptResult, DueEvent, Outcome, SqlStore
from collector.validation import Conversion, now_ms
from tests.fault.helpers import (
    FORM,
    QUICK_RELAY_ENV,
    all_finished,
    attempts_by_callback,
    delivery_figures,
    engine_of,
    form_conversions,
    query,
    queue_conversions,
    status_counts,
    wait_until,
)
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess, run_cli

DAY_MS = 86_400_000
# Retries give up 1.8 s after an event arrived.
SHORT_LIFE_ENV = {**QUICK_RELAY_ENV, "KS_COLLECTOR_RETRY_MAX_AGE_HOURS": "0.0005"}


def test_events_failing_past_the_retry_age_go_dead_and_a_replay_delivers_them(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode("http_503")
    callbacks = queue_conversions(outbox, form_conversions("dead", 20))
    with RelayProcess(SHORT_LIFE_ENV, database_url=database_url, upstream_url=mock_kuaishou.url):
        wait_until(lambda: status_counts(outbox) == {"dead": 20}, 20, "every event to be dead")
        calls_when_dead = len(mock_kuaishou.requests())
        time.sleep(0.6)  # three retry intervals: a dead event is not tried again
        assert len(mock_kuaishou.requests()) == calls_when_dead
        tries_before_replay = {cb: len(tries) for cb, tries in attempts_by_callback(outbox).items()}
        assert min(tries_before_replay.values()) >= 2
        assert query(outbox, "SELECT DISTINCT last_error FROM events") == [("HTTP 503",)]

        mock_kuaishou.set_mode("ok")
        replay = run_cli(["replay", "--error", "http 503"], database_url=database_url)
        assert replay.stdout.strip() == "re-queued 20 events"
        wait_until(lambda: all_finished(outbox, 20), 20, "the replayed events to be delivered")

    figures = delivery_figures(
        "kuaishou failing past the retry age, then replayed",
        engine_of(database_url),
        callbacks,
        mock_kuaishou,
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (20, 0, 0)
    assert status_counts(outbox) == {"delivered": 20}
    # The backoff started over after the replay; every earlier try is still on record.
    assert query(outbox, "SELECT DISTINCT attempts FROM events") == [(1,)]
    tries_after = {cb: len(tries) for cb, tries in attempts_by_callback(outbox).items()}
    assert tries_after == {cb: count + 1 for cb, count in tries_before_replay.items()}


def received(callback: str, received_at_ms: int) -> Conversion:
    return Conversion(
        event_type=FORM,
        callback=callback,
        event_time_ms=received_at_ms,
        received_at_ms=received_at_ms,
        source="api",
        event_id=callback,
    )


def finish(store: SqlStore, outcome: str, at_ms: int) -> list[DueEvent]:
    """Claim every due event and record one final ``outcome`` for each, as a relay would."""
    due = store.claim_due("test-relay", 100, now_ms(), 60_000)
    answers = {
        "delivered": (Outcome.DELIVERED, 200, '{"result":1}', None, False),
        "rejected": (
            Outcome.REJECTED,
            200,
            '{"result":0,"error_msg":"callbackinfo decodedfailure"}',
            "callbackinfo decodedfailure",
            False,
        ),
        "dead": (Outcome.TRANSIENT, 503, "", "HTTP 503", True),
    }
    kind, status, body, error, dead = answers[outcome]
    store.record_attempts(
        "test-relay",
        [AttemptResult(event, kind, at_ms, 12, status, body, error, None, dead) for event in due],
    )
    return due


def ids_of(store: SqlStore, status: str) -> list[int]:
    return [row[0] for row in query(store, "SELECT id FROM events WHERE status = ?", (status,))]


def replay(database_url: str, *args: str) -> str:
    return run_cli(["replay", *args], database_url=database_url).stdout.strip()


def test_replay_chooses_events_by_id_time_range_and_error_and_says_how_many(
    database_url: str, outbox: SqlStore
) -> None:
    now = now_ms()
    for age_days, outcome in ((3, "rejected"), (3, "dead"), (1, "rejected"), (1, "dead")):
        received_at = now - age_days * DAY_MS
        outbox.add_conversions([received(f"{outcome}-{age_days}d", received_at)], frozenset())
        finish(outbox, outcome, received_at + 1000)
    queue_conversions(outbox, [received("delivered-now", now)])
    [delivered] = finish(outbox, "delivered", now)
    queue_conversions(outbox, [received("pending-now", now)])
    [pending_id] = ids_of(outbox, "pending")

    # Only dead and rejected events are ever re-queued.
    assert replay(database_url, "--id", str(delivered.id), "--id", str(pending_id)) == (
        "re-queued 0 events (no dead or rejected event matched: only those can be replayed)"
    )
    assert replay(database_url, "--since", "2d", "--until", "12h") == "re-queued 2 events"
    assert sorted(
        row[0] for row in query(outbox, "SELECT callback FROM events WHERE status = 'pending'")
    ) == [
        "dead-1d",
        "pending-now",
        "rejected-1d",
    ]
    assert replay(database_url, "--error", "DECODEDFAILURE") == "re-queued 1 event"
    assert query(outbox, "SELECT status FROM events WHERE callback = 'rejected-3d'") == [
        ("pending",)
    ]
    [dead_id] = ids_of(outbox, "dead")
    assert replay(database_url, "--id", str(dead_id)) == "re-queued 1 event"
    assert status_counts(outbox) == {"delivered": 1, "pending": 5}

    refused = run_cli(["replay"], database_url=database_url, check=False)
    assert refused.returncode == 2
    assert "say which events" in refused.stderr


def test_purge_deletes_only_delivered_events_older_than_the_cutoff(
    database_url: str, outbox: SqlStore
) -> None:
    now = now_ms()
    old = now - 40 * DAY_MS
    queue_conversions(outbox, [received(f"old-{n}", old) for n in range(3)])
    finish(outbox, "delivered", old)
    queue_conversions(outbox, [received("old-rejected", old)])
    finish(outbox, "rejected", old)
    queue_conversions(outbox, [received("old-dead", old)])
    finish(outbox, "dead", old)
    queue_conversions(outbox, [received(f"recent-{n}", now) for n in range(2)])
    finish(outbox, "delivered", now - DAY_MS)
    queue_conversions(outbox, [received("old-pending", old)])

    purge = run_cli(["purge", "--older-than", "30d"], database_url=database_url)
    assert purge.stdout.strip() == "purged 3 delivered events"
    remaining = sorted(row[0] for row in query(outbox, "SELECT callback FROM events"))
    assert remaining == ["old-dead", "old-pending", "old-rejected", "recent-0", "recent-1"]
    assert sorted(attempts_by_callback(outbox)) == [
        "old-dead",
        "old-rejected",
        "recent-0",
        "recent-1",
    ]
    assert run_cli(["purge", "--older-than", "30d"], database_url=database_url).stdout.strip() == (
        "purged 0 delivered events"
    )
