"""Nothing in a request can change where the relay sends, or what else it sends.

Events carrying hostile click ids go in through both doors (tag and API) of a real
``ks-collector serve``; each must reach the mock Kuaishou as one GET to the configured path
and host, with exactly the three parameters and the click id intact.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.hostile.apps import CRM_TOKEN
from tests.support.mock_kuaishou import TRACK_PATH
from tests.support.processes import CollectorServer, run_cli

# Click ids that try to smuggle something into the upstream URL; each must arrive as it is.
SMUGGLING = [
    "abc&event_type=3&purchase_amount=999",
    "abc#fragment",
    "abc?event_type=3",
    "?callback=other&event_type=3",
    "abc;event_type=3",
    "abc/../../admin",
    "@evil.example.com/track/activate",
    "//evil.example.com/track/activate",
    "abc%26event_type%3D3",
    "abc%0d%0aHost:%20evil.example.com",
    "a b+c",
    "点击=值&x",
    "abc http://evil.example.com/",
    "=",
    "&",
]
# Whole activate URLs pasted as click ids are unwrapped to their own callback, and surrounding
# whitespace (Unicode's too) is dropped; nothing else is changed.
NORMALIZED = {
    "http://evil.example.com/track/activate?callback=inner-1&event_type=3": "inner-1",
    "https%3A%2F%2Fevil.example.com%2F%3Fcallback%3Dinner-2%26event_type%3D3": "inner-2",
    "\u2028abc\u2029": "abc",
}
# Click ids refused at the door, never sent anywhere.
REFUSED = ["abc\r\nHost: evil.example.com", "abc\nx", "abc\x00", "a\tb"]


def post_json(url: str, document: object, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(document).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def server(mock_kuaishou, sqlite_url):
    env = {
        "KS_COLLECTOR_API_TOKENS": f"crm:{CRM_TOKEN}",
        "KS_COLLECTOR_RATE_LIMIT_IP": "1000/minute",
    }
    with CollectorServer(env, database_url=sqlite_url, upstream_url=mock_kuaishou.url) as process:
        yield process


def test_hostile_click_ids_reach_the_configured_upstream_as_one_parameter(server, mock_kuaishou):
    api = {"Authorization": f"Bearer {CRM_TOKEN}", "Content-Type": "application/json"}
    sent = {callback: callback for callback in SMUGGLING} | NORMALIZED
    batch = [{"event_type": "form", "callback": callback} for callback in sent]
    # Half through the API, half as tag beacons, so both doors are checked.
    api_status, _ = post_json(server.url + "/api/v1/conversions", {"events": batch[::2]}, api)
    tag_statuses = [
        post_json(
            server.url + "/collect",
            {"v": 1, "id": f"tag-{n}", "type": "form", "callback": event["callback"]},
            {"Content-Type": "text/plain;charset=UTF-8"},
        )[0]
        for n, event in enumerate(batch[1::2])
    ]

    calls = mock_kuaishou.wait_for_requests(len(sent), timeout=20)

    assert (api_status, set(tag_statuses)) == (202, {202})
    upstream = urllib.parse.urlsplit(mock_kuaishou.url)
    for call in calls:
        assert call["method"] == "GET"
        assert call["path"] == TRACK_PATH
        assert call["headers"]["host"] == upstream.netloc
        assert sorted(call["params"]) == ["callback", "event_time", "event_type"]
        assert call["params"]["event_type"] == ["9"]
        assert len(call["params"]["callback"]) == 1
    arrived = sorted(call["params"]["callback"][0] for call in calls)
    assert arrived == sorted(sent.values())


def test_click_ids_with_control_characters_are_refused_and_never_sent(
    server, mock_kuaishou, sqlite_url
):
    api = {"Authorization": f"Bearer {CRM_TOKEN}", "Content-Type": "application/json"}

    answers = [
        post_json(server.url + "/api/v1/conversions", {"event_type": 9, "callback": callback}, api)
        for callback in REFUSED
    ]

    # NUL is refused by the JSON reader (400), the others by validation (422).
    assert [(status, answer["error"]) for status, answer in answers] == [
        (422, "invalid_events"),
        (422, "invalid_events"),
        (400, "bad_body"),
        (422, "invalid_events"),
    ]
    assert run_cli(["events", "--json"], database_url=sqlite_url).stdout == ""
    assert mock_kuaishou.requests() == []


def test_no_field_of_an_event_can_name_another_upstream(server):
    api = {"Authorization": f"Bearer {CRM_TOKEN}", "Content-Type": "application/json"}
    event = {"event_type": "form", "callback": "CB-1", "upstream_url": "http://evil.example.com/"}

    status, answer = post_json(server.url + "/api/v1/conversions", event, api)

    assert status == 422
    assert list(answer["events"][0]["errors"]) == ["upstream_url"]
