"""Kuaishou misbehaving: down, failing, answering garbage, hanging, or refusing a callback.

A real ``ks-collector relay`` delivers events committed to a real store; the mock plays the
upstream. Transient trouble must end with every event delivered once and each failed try
recorded with its class; a decode failure must end the event after one try.
"""

from __future__ import annotations

import time

import pytest

from collector.store import SqlStore
from tests.fault.helpers import (
    QUICK_RELAY_ENV,
    all_finished,
    attempts_by_callback,
    delivery_figures,
    engine_of,
    form_conversions,
    queue_conversions,
    status_counts,
    wait_until,
)
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess

SUCCESS = '{"result":1}'


def test_events_queued_while_kuaishou_refuses_connections_are_delivered_once_it_is_back(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.stop()  # connections to its port are now refused
    callbacks = queue_conversions(outbox, form_conversions("down", 200))
    relay = RelayProcess(QUICK_RELAY_ENV, database_url=database_url, upstream_url=mock_kuaishou.url)
    relay.start()

    def every_event_tried_twice() -> bool:
        attempts = attempts_by_callback(outbox)
        return len(attempts) == 200 and all(len(tries) >= 2 for tries in attempts.values())

    wait_until(every_event_tried_twice, 20, "two refused attempts per event")
    mock_kuaishou.start()
    wait_until(lambda: all_finished(outbox, 200), 30, "every event to be delivered")
    relay.terminate()

    figures = delivery_figures(
        "kuaishou down, then back", engine_of(database_url), callbacks, mock_kuaishou
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (200, 0, 0)
    assert status_counts(outbox) == {"delivered": 200}
    for tries in attempts_by_callback(outbox).values():
        *refused, last = tries
        assert {(t["outcome"], t["http_status"]) for t in refused} == {("transient", None)}
        assert all("Connection refused" in t["error"] for t in refused)
        assert (last["outcome"], last["http_status"], last["response"]) == (
            "delivered",
            200,
            SUCCESS,
        )


# What each failure looks like in the attempts table: HTTP status, error, start of the body.
FAILURES = {
    "http_503": (503, "HTTP 503", ""),
    "http_500": (500, "HTTP 500", ""),
    "html": (200, "answer is not JSON", "<html>"),
    "hang": (None, "no answer within 1 s", None),
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_failing_answers_are_retried_and_recorded_until_every_event_is_delivered(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou, mode: str
) -> None:
    events = 40
    failing_calls = 60  # more than one round: some events fail twice
    mock_kuaishou.set_mode(mode, fail_first_n=failing_calls)
    callbacks = queue_conversions(outbox, form_conversions(mode, events))
    with RelayProcess(QUICK_RELAY_ENV, database_url=database_url, upstream_url=mock_kuaishou.url):
        wait_until(lambda: all_finished(outbox, events), 30, "every event to be delivered")

    figures = delivery_figures(
        f"kuaishou answering {mode}, then healthy",
        engine_of(database_url),
        callbacks,
        mock_kuaishou,
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (events, 0, 0)
    assert status_counts(outbox) == {"delivered": events}
    http_status, error, body_start = FAILURES[mode]
    failed = []
    for tries in attempts_by_callback(outbox).values():
        *transient, last = tries
        assert (last["outcome"], last["http_status"], last["response"]) == (
            "delivered",
            200,
            SUCCESS,
        )
        failed += transient
    assert len(failed) == failing_calls
    assert {(t["outcome"], t["http_status"], t["error"]) for t in failed} == {
        ("transient", http_status, error)
    }
    if body_start is None:
        assert {t["response"] for t in failed} == {None}
        assert min(t["latency_ms"] for t in failed) >= 1000  # waited out the timeout
    else:
        assert all((t["response"] or "").startswith(body_start) for t in failed)


def test_decode_failure_is_rejected_after_one_attempt_and_holds_back_no_other_event(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode(callback_modes={"bad": "decode_failure"})
    bad = queue_conversions(outbox, form_conversions("bad", 10))
    good = queue_conversions(outbox, form_conversions("good", 50))
    with RelayProcess(QUICK_RELAY_ENV, database_url=database_url, upstream_url=mock_kuaishou.url):
        wait_until(lambda: all_finished(outbox, 60), 20, "every event to be finished")
        settled_calls = len(mock_kuaishou.requests())
        # Five retry intervals (0.2 s base) pass: a rejected event must not be tried again.
        time.sleep(1.0)
        assert len(mock_kuaishou.requests()) == settled_calls

    figures = delivery_figures(
        "decode failure for some callbacks", engine_of(database_url), good, mock_kuaishou
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (50, 0, 0)
    assert status_counts(outbox) == {"delivered": 50, "rejected": 10}
    attempts = attempts_by_callback(outbox)
    for callback in bad:
        [only] = attempts[callback]
        assert (only["outcome"], only["http_status"], only["error"]) == (
            "rejected",
            200,
            "callbackinfo decodedfailure",
        )
    calls_per_bad = [
        call["params"]["callback"][0]
        for call in mock_kuaishou.requests()
        if call["params"]["callback"][0].startswith("bad")
    ]
    assert sorted(calls_per_bad) == sorted(bad)
