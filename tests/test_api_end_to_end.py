"""The conversion API end to end: a real ``ks-collector serve`` relaying to mock Kuaishou.

One server and one mock serve the whole module; each test uses click ids of its own and reads
only the upstream calls for them. "Arrives once" is judged after the outbox has no pending
event left: by then every event the server stored has been answered by the mock, so a second
call would already be in its records.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import requests

from collector.store import SqlStore, open_store
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import CollectorServer

TOKEN = "e2e-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Events here are delivered in milliseconds; this only bounds a failing test.
DRAIN_TIMEOUT = 15.0


class Collector:
    """The running server, the mock behind it and the store file they share."""

    def __init__(self, server: CollectorServer, mock: MockKuaishou, store: SqlStore) -> None:
        self.server = server
        self.mock = mock
        self.store = store
        self.http = requests.Session()

    def post_api(self, body: dict, headers: dict = AUTH) -> requests.Response:
        return self.http.post(
            f"{self.server.url}/api/v1/conversions", json=body, headers=headers, timeout=10
        )

    def beacon(self, **fields) -> requests.Response:
        """A beacon as static/tag.js sends it: text/plain JSON, no preflight."""
        body = {"v": 1, "id": uuid.uuid4().hex, "age_ms": 0, **fields}
        return self.http.post(
            f"{self.server.url}/collect",
            data=json.dumps(body),
            headers={"Content-Type": "text/plain;charset=UTF-8"},
            timeout=10,
        )

    def upstream_calls(self, callback: str) -> list[dict[str, list[str]]]:
        """Query parameters of every call that reached mock Kuaishou for ``callback``, once the
        outbox has nothing left to send."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.store.count_status("pending"):
            if time.monotonic() > deadline:
                raise AssertionError(f"events still pending after {DRAIN_TIMEOUT}s")
            time.sleep(0.02)
        return [
            call["params"]
            for call in self.mock.requests()
            if call["params"].get("callback") == [callback]
        ]


@pytest.fixture(scope="module")
def collector(tmp_path_factory) -> Iterator[Collector]:
    database_url = f"sqlite:///{tmp_path_factory.mktemp('e2e') / 'ks-collector.db'}"
    with MockKuaishou() as mock:
        server = CollectorServer(
            {"KS_COLLECTOR_API_TOKENS": f"crm:{TOKEN}"},
            database_url=database_url,
            upstream_url=mock.url,
        )
        with server:
            store = open_store(database_url)
            yield Collector(server, mock, store)
            store.close()


def click_id() -> str:
    return f"CLICK-{uuid.uuid4().hex}"


def accepted(response: requests.Response) -> list[dict]:
    assert response.status_code == 202, response.text
    return response.json()["results"]


def test_a_payment_of_9_9_arrives_as_purchase_amount_9_90(collector):
    callback = click_id()
    accepted(collector.post_api({"event_type": 3, "callback": callback, "purchase_amount": 9.9}))

    [call] = collector.upstream_calls(callback)
    assert call["event_type"] == ["3"]
    assert call["purchase_amount"] == ["9.90"]
    assert sorted(call) == ["callback", "event_time", "event_type", "purchase_amount"]


def test_registration_sent_twice_arrives_once(collector):
    callback = click_id()
    [first] = accepted(collector.post_api({"event_type": "registration", "callback": callback}))
    [second] = accepted(collector.post_api({"event_type": "registration", "callback": callback}))

    assert (first["status"], second["status"]) == ("accepted", "duplicate")
    assert [call["event_type"] for call in collector.upstream_calls(callback)] == [["2"]]


def test_a_repeated_event_id_arrives_once(collector):
    callback = click_id()
    body = {"event_type": 3, "callback": callback, "purchase_amount": 20, "event_id": callback}
    accepted(collector.post_api(body))
    [again] = accepted(collector.post_api(body))

    assert again["status"] == "duplicate"
    assert len(collector.upstream_calls(callback)) == 1


def test_a_form_from_the_tag_then_from_the_api_arrives_once(collector):
    callback = click_id()
    tag = collector.beacon(type="form", callback=callback)
    assert tag.status_code == 202
    [from_api] = accepted(collector.post_api({"event_type": "form", "callback": callback}))

    assert (tag.json()["status"], from_api["status"]) == ("accepted", "duplicate")
    assert [call["event_type"] for call in collector.upstream_calls(callback)] == [["9"]]


def test_phone_contact_failed_arrives_with_its_action_reason(collector):
    callback = click_id()
    accepted(collector.post_api({"event_type": 120, "callback": callback, "action_reason": 4}))

    [call] = collector.upstream_calls(callback)
    assert (call["event_type"], call["action_reason"]) == (["120"], ["4"])


def test_a_lead_id_from_the_tag_resolves_to_its_callback_upstream(collector):
    callback, lead_id = click_id(), f"L-{uuid.uuid4().hex[:12]}"
    assert collector.beacon(type="form", callback=callback, lead_id=lead_id).status_code == 202
    accepted(collector.post_api({"event_type": "deal", "lead_id": lead_id}))

    calls = collector.upstream_calls(callback)
    assert sorted(call["event_type"][0] for call in calls) == ["119", "9"]


def test_a_whole_activate_url_as_callback_arrives_as_its_inner_callback(collector):
    callback = click_id() + "+/="
    pasted = "http://ad.partner.gifshow.com/track/activate?callback=" + quote(callback, safe="")
    body = {"event_type": "valid_lead", "callback": quote(pasted, safe="")}
    accepted(collector.post_api(body))

    [call] = collector.upstream_calls(callback)
    assert call["event_type"] == ["44"]


def test_a_batch_with_a_bad_event_sends_nothing_upstream(collector):
    good, bad = click_id(), click_id()
    events = [
        {"event_type": 9, "callback": good},
        {"event_type": 3, "callback": bad, "purchase_amount": "9.999"},
    ]
    response = collector.post_api({"events": events})

    assert response.status_code == 422
    assert collector.upstream_calls(good) == []
    assert collector.upstream_calls(bad) == []


def test_a_server_only_event_from_a_beacon_is_refused_and_sends_nothing(collector):
    callback = click_id()
    response = collector.beacon(type="payment", callback=callback)

    assert response.status_code == 422
    assert response.json()["fields"] == {
        "type": [
            "payment (3) cannot be reported from a browser; "
            "send it from your server through /api/v1/conversions"
        ]
    }
    assert collector.upstream_calls(callback) == []


def test_the_api_refuses_a_caller_without_the_token(collector):
    callback = click_id()
    response = collector.post_api({"event_type": 9, "callback": callback}, headers={})

    assert response.status_code == 401
    assert collector.upstream_calls(callback) == []


def test_the_openapi_document_is_served(collector):
    response = collector.http.get(f"{collector.server.url}/api/v1/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.json()["info"]["title"] == "ks-collector conversion API"
