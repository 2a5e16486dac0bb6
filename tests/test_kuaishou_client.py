"""The Kuaishou client: what goes on the wire, and what each kind of answer means.

Delivered: HTTP 200 with JSON ``result == 1``. Rejected for good: a JSON ``error_msg`` such as
``callbackinfo decodedfailure``, or a 4xx other than 408 and 429. Anything else (timeouts,
refused or dropped connections, 5xx, 408, 429, a 200 that is not JSON) is transient.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import pytest

from collector.kuaishou import KuaishouClient, build_params, classify, parse_retry_after
from collector.store import DueEvent, Outcome
from tests.support.mock_kuaishou import MockKuaishou

TIMEOUT_SECONDS = 1.0


def due_event(callback: str = "CLICK-abc", /, **params: str) -> DueEvent:
    return DueEvent(
        id=7,
        event_id="e-7",
        event_type=3,
        callback=callback,
        event_time_ms=1_700_000_000_123,
        params=params,
        attempts=1,
        age_base_ms=1_700_000_000_123,
    )


@pytest.fixture
def client(mock_kuaishou: MockKuaishou) -> Iterator[KuaishouClient]:
    client = KuaishouClient(mock_kuaishou.url, TIMEOUT_SECONDS, pool_size=4)
    yield client
    client.close()


# ---- what is sent ------------------------------------------------------------------------------


def test_event_is_sent_as_one_get_with_callback_type_time_and_its_parameters(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    client.send(due_event("CLICK-abc", purchase_amount="12.50"))

    [call] = mock_kuaishou.requests()
    assert (call["method"], call["path"]) == ("GET", "/track/activate")
    assert call["params"] == {
        "callback": ["CLICK-abc"],
        "event_type": ["3"],
        "event_time": ["1700000000123"],
        "purchase_amount": ["12.50"],
    }


def test_callback_with_reserved_and_non_ascii_characters_arrives_unchanged(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    callback = "a&b=c%2Fd+e f/快手?x#y"
    client.send(due_event(callback))

    [call] = mock_kuaishou.requests()
    assert call["params"]["callback"] == [callback]


def test_event_parameters_cannot_override_the_callback_type_or_time() -> None:
    event = due_event("REAL", callback="FORGED", event_type="1", event_time="0")

    assert build_params(event) == {
        "callback": "REAL",
        "event_type": "3",
        "event_time": "1700000000123",
    }


def test_calls_reuse_one_keep_alive_connection(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    for number in range(5):
        client.send(due_event(f"CLICK-{number}"))

    assert len({call["connection"] for call in mock_kuaishou.requests()}) == 1


# ---- what answers mean -------------------------------------------------------------------------


def test_result_1_is_delivered_with_status_body_and_latency(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode("ok", latency_ms=50)

    answer = client.send(due_event())

    assert (answer.outcome, answer.http_status, answer.response, answer.error) == (
        Outcome.DELIVERED,
        200,
        '{"result":1}',
        None,
    )
    assert 50 <= answer.latency_ms < 1000


def test_decode_failure_is_rejected_with_kuaishous_message(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode("decode_failure")

    answer = client.send(due_event())

    assert (answer.outcome, answer.http_status, answer.error) == (
        Outcome.REJECTED,
        200,
        "callbackinfo decodedfailure",
    )
    assert '"error_msg":"callbackinfo decodedfailure"' in (answer.response or "")


@pytest.mark.parametrize(
    ("mode", "http_status", "error"),
    [
        ("http_503", 503, "HTTP 503"),
        ("http_500", 500, "HTTP 500"),
        ("http_429", 429, "HTTP 429"),
        ("html", 200, "answer is not JSON"),
    ],
)
def test_server_errors_rate_limits_and_html_pages_are_transient(
    client: KuaishouClient, mock_kuaishou: MockKuaishou, mode: str, http_status: int, error: str
) -> None:
    mock_kuaishou.set_mode(mode)

    answer = client.send(due_event())

    assert (answer.outcome, answer.http_status, answer.error) == (
        Outcome.TRANSIENT,
        http_status,
        error,
    )


def test_429_retry_after_is_passed_on(client: KuaishouClient, mock_kuaishou: MockKuaishou) -> None:
    mock_kuaishou.set_mode("http_429", retry_after="120")

    assert client.send(due_event()).retry_after_seconds == 120.0


def test_no_answer_within_the_timeout_is_transient(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode("hang")

    answer = client.send(due_event())

    assert (answer.outcome, answer.http_status, answer.response, answer.error) == (
        Outcome.TRANSIENT,
        None,
        None,
        "no answer within 1 s",
    )
    assert 1000 <= answer.latency_ms < 3000


def test_connection_closed_without_an_answer_is_transient_and_keeps_the_click_id_out_of_the_error(
    client: KuaishouClient, mock_kuaishou: MockKuaishou
) -> None:
    mock_kuaishou.set_mode("close")

    answer = client.send(due_event("SECRET-CLICK-ID"))

    assert (answer.outcome, answer.http_status) == (Outcome.TRANSIENT, None)
    assert "ConnectionError" in (answer.error or "")
    assert "SECRET-CLICK-ID" not in (answer.error or "")


def test_refused_connection_is_transient_and_keeps_the_click_id_out_of_the_error(
    mock_kuaishou: MockKuaishou,
) -> None:
    url = mock_kuaishou.url
    mock_kuaishou.stop()
    client = KuaishouClient(url, TIMEOUT_SECONDS, pool_size=1)

    answer = client.send(due_event("SECRET-CLICK-ID"))

    assert (answer.outcome, answer.http_status) == (Outcome.TRANSIENT, None)
    assert "Connection refused" in (answer.error or "")
    assert "SECRET-CLICK-ID" not in (answer.error or "")


def test_4xx_from_the_endpoint_is_rejected_for_good(mock_kuaishou: MockKuaishou) -> None:
    # The mock answers 404 off /track/activate: a misconfigured URL is not worth retrying.
    client = KuaishouClient(mock_kuaishou.base_url + "/track/wrong", TIMEOUT_SECONDS, 1)

    answer = client.send(due_event())

    assert (answer.outcome, answer.http_status, answer.error) == (
        Outcome.REJECTED,
        404,
        "HTTP 404",
    )


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, '{"result":1}', Outcome.DELIVERED),
        (200, '{"result":0,"error_msg":"callbackinfo decodedfailure"}', Outcome.REJECTED),
        (200, '{"result":0}', Outcome.TRANSIENT),
        (200, "[1]", Outcome.TRANSIENT),
        (200, "", Outcome.TRANSIENT),
        (302, "", Outcome.TRANSIENT),
        (400, "bad", Outcome.REJECTED),
        (403, "forbidden", Outcome.REJECTED),
        (408, "", Outcome.TRANSIENT),
        (429, "", Outcome.TRANSIENT),
        (502, "<html>", Outcome.TRANSIENT),
        (504, "", Outcome.TRANSIENT),
    ],
)
def test_each_http_answer_falls_in_one_outcome_class(
    status: int, body: str, outcome: Outcome
) -> None:
    assert classify(status, body).outcome is outcome


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)

    assert parse_retry_after("30") == 30.0
    assert 55 <= (parse_retry_after(in_a_minute) or 0) <= 60
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
