"""Limits on the public endpoints: body sizes, strict JSON, string lengths and rate limits."""

from __future__ import annotations

import http.client
import io
import json
import threading
from urllib.parse import quote, urlsplit

import pytest

from collector.validation import MAX_CALLBACK_BYTES
from tests.hostile.apps import (
    CRM_TOKEN,
    beacon,
    beacon_bytes,
    collector_app,
    refused_count,
    stored_events,
)
from tests.support.processes import WebProcess, run_cli

API = "/api/v1/conversions"
AUTH = {"Authorization": f"Bearer {CRM_TOKEN}"}


@pytest.fixture
def app(tmp_path):
    return collector_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


def padded(document: dict, size: int) -> bytes:
    """``document`` as JSON followed by spaces up to exactly ``size`` bytes (still valid JSON)."""
    raw = json.dumps(document).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


# ---- body sizes -------------------------------------------------------------------------------


def test_beacon_of_exactly_8_kb_is_accepted(client):
    response = client.post("/collect", data=padded(beacon(), 8 * 1024))

    assert response.status_code == 202


def test_beacon_over_8_kb_is_refused_with_413(client, app):
    response = client.post("/collect", data=padded(beacon(), 8 * 1024 + 1))

    assert response.status_code == 413
    assert response.get_json() == {
        "error": "payload_too_large",
        "message": "the body is larger than 8192 bytes",
    }
    assert stored_events(app) == []


def test_beacon_over_8_kb_without_content_length_is_refused_with_413(client):
    # A chunked body announces no length; gunicorn marks such input as terminated, and the
    # collector stops reading one byte past the limit.
    response = client.post(
        "/collect",
        input_stream=io.BytesIO(padded(beacon(), 8 * 1024 + 1)),
        environ_overrides={"wsgi.input_terminated": True},
    )

    assert response.status_code == 413


def test_image_beacon_over_8_kb_is_refused_with_414(client):
    huge = json.dumps(beacon(callback="x" * 9000))

    response = client.get("/collect?d=" + quote(huge))

    assert response.status_code == 414
    assert response.get_json() == {
        "error": "uri_too_long",
        "message": "d is larger than 8192 bytes",
    }


def test_api_body_of_exactly_1_mb_is_accepted(client):
    event = {"event_type": "form", "callback": "CB-1"}

    response = client.post(API, data=padded(event, 1024 * 1024), headers=AUTH)

    assert response.status_code == 202


def test_api_body_over_1_mb_is_refused_with_413(client, app):
    event = {"event_type": "form", "callback": "CB-1"}

    response = client.post(API, data=padded(event, 1024 * 1024 + 1), headers=AUTH)

    assert response.status_code == 413
    assert response.get_json() == {
        "error": "payload_too_large",
        "message": "the body is larger than 1048576 bytes",
    }
    assert stored_events(app) == []


# ---- strict JSON ------------------------------------------------------------------------------

MALFORMED = {
    "invalid UTF-8": (b'{"v":1,"callback":"\xff\xfe"}', "the body is not valid UTF-8"),
    "UTF-16": ('{"v":1}'.encode("utf-16"), "the body is not valid UTF-8"),
    "NaN": (b'{"v":NaN}', "NaN is not valid JSON"),
    "Infinity": (b'{"v":-Infinity}', "-Infinity is not valid JSON"),
    "1e400": (b'{"v":1e400}', "the number 1e400 is out of range"),
    "duplicate key": (b'{"v":1,"v":1}', "duplicate key 'v' in JSON object"),
    "nine levels": (b'{"a":' * 8 + b"1" + b"}" * 8, "the JSON is nested more than 8 levels deep"),
    "lone surrogate": (
        b'{"callback":"\\ud800"}',
        "the JSON has a string with an unpaired surrogate escape",
    ),
    "surrogate key": (b'{"\\udfff":1}', "the JSON has a string with an unpaired surrogate escape"),
    "empty": (b"", "the body is empty; send a JSON object"),
    "blank": (b" \r\n\t", "the body is empty; send a JSON object"),
}


@pytest.mark.parametrize("name", MALFORMED)
@pytest.mark.parametrize("path", ["/collect", API])
def test_malformed_json_is_refused_with_400_saying_why(client, path, name):
    raw, message = MALFORMED[name]

    response = client.post(path, data=raw, headers=AUTH)

    assert response.status_code == 400
    assert response.get_json() == {"error": "bad_body", "message": message}


def test_eight_levels_of_nesting_are_still_parsed(client):
    # The limit refuses the ninth level only: this body is refused for its content, not shape.
    nested = b'{"a":' * 7 + b"1" + b"}" * 7

    response = client.post("/collect", data=nested)

    assert response.status_code == 422


def test_a_paired_surrogate_escape_is_an_ordinary_character(client, app):
    raw = b'{"v":1,"id":"e1","type":"form","callback":"CB-\\ud83d\\ude00"}'

    response = client.post("/collect", data=raw)

    assert response.status_code == 202
    assert stored_events(app)[0]["callback"] == "CB-\U0001f600"


def test_beacon_content_type_does_not_matter(client):
    # sendBeacon and fetch send text/plain; a form-encoded or JSON type is read the same way.
    for content_type in ("text/plain;charset=UTF-8", "application/json", "multipart/form-data"):
        response = client.post(
            "/collect", data=beacon_bytes(callback=content_type), content_type=content_type
        )
        assert response.status_code == 202, content_type


# ---- string lengths ---------------------------------------------------------------------------


def test_callback_of_the_largest_size_is_accepted(client):
    assert (
        client.post("/collect", data=beacon_bytes(callback="c" * MAX_CALLBACK_BYTES)).status_code
        == 202
    )


# The exact wording of each refusal belongs to collector/validation.py; here the point is
# which field was refused.


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("callback", "c" * 4097),
        ("callback", "点" * 1366),  # 4098 bytes in UTF-8
        ("id", "i" * 129),
        ("lead_id", "L" * 129),
    ],
    ids=["callback", "callback-utf8", "id", "lead_id"],
)
def test_overlong_beacon_strings_are_refused(client, field, value):
    body = beacon()
    body[field] = value

    response = client.post("/collect", data=json.dumps(body, ensure_ascii=False).encode())

    assert response.status_code == 422
    assert list(response.get_json()["fields"]) == [field]


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"event_type": 9, "callback": "c" * 4097}, "callback"),
        ({"event_type": 9, "lead_id": "L" * 129}, "lead_id"),
        ({"event_type": 9, "callback": "CB", "event_id": "e" * 129}, "event_id"),
        (
            {"event_type": 143, "callback": "CB", "key_action_category": "k" * 65},
            "key_action_category",
        ),
        (
            {"event_type": 182, "callback": "CB", "server_type": 1, "connection_server": "s" * 129},
            "connection_server",
        ),
    ],
    ids=["callback", "lead_id", "event_id", "key_action_category", "connection_server"],
)
def test_overlong_api_strings_are_refused(client, event, field):
    response = client.post(API, json=event, headers=AUTH)

    assert response.status_code == 422
    [problem] = response.get_json()["events"]
    assert list(problem["errors"]) == [field]


# ---- rate limits ------------------------------------------------------------------------------


def send(client, body: bytes, address: str = "198.51.100.1", **headers: str):
    return client.post(
        "/collect", data=body, environ_base={"REMOTE_ADDR": address}, headers=headers
    )


def test_beacons_past_the_per_address_limit_get_429_with_retry_after(tmp_path):
    app = collector_app(tmp_path, rate_limit_ip="3/minute", rate_limit_callback="100/minute")
    client = app.test_client()
    before = refused_count("tag", "rate_limit_ip")

    answers = [send(client, beacon_bytes(callback=f"CB-{n}")) for n in range(5)]

    assert [response.status_code for response in answers] == [202, 202, 202, 429, 429]
    limited = answers[3]
    assert limited.get_json() == {
        "error": "rate_limited",
        "message": "too many beacons from this address (limit 3/minute)",
    }
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert len(stored_events(app)) == 3
    assert refused_count("tag", "rate_limit_ip") == before + 2


def test_one_address_flooding_does_not_limit_another(tmp_path):
    client = collector_app(tmp_path, rate_limit_ip="2/minute").test_client()
    for n in range(3):
        send(client, beacon_bytes(callback=f"CB-{n}"), "198.51.100.1")

    assert send(client, beacon_bytes(callback="CB-other"), "198.51.100.2").status_code == 202


def test_refused_beacons_count_against_the_address_limit(tmp_path):
    client = collector_app(tmp_path, rate_limit_ip="3/minute").test_client()
    for _ in range(3):
        assert send(client, b"not json").status_code == 400

    assert send(client, beacon_bytes()).status_code == 429


def test_beacons_past_the_per_click_limit_get_429_from_any_address(tmp_path):
    app = collector_app(tmp_path, rate_limit_ip="100/minute", rate_limit_callback="2/minute")
    client = app.test_client()
    before = refused_count("tag", "rate_limit_callback")

    answers = [
        send(client, beacon_bytes(callback="CB-HOT"), f"198.51.100.{n}").status_code
        for n in range(1, 5)
    ]
    other_click = send(client, beacon_bytes(callback="CB-COLD"), "198.51.100.9")

    assert answers == [202, 202, 429, 429]
    assert other_click.status_code == 202
    assert refused_count("tag", "rate_limit_callback") == before + 2


def test_per_click_limit_reads_the_click_id_from_image_beacons_too(tmp_path):
    client = collector_app(tmp_path, rate_limit_callback="2/minute").test_client()
    send(client, beacon_bytes(callback="CB-HOT"))
    client.get("/collect?d=" + quote(json.dumps(beacon(callback="CB-HOT"))))

    image = client.get("/collect?d=" + quote(json.dumps(beacon(callback="CB-HOT"))))

    assert image.status_code == 429
    assert image.get_json()["message"] == "too many beacons for this click id (limit 2/minute)"


def test_per_click_limit_sees_through_spellings_of_one_click_id(tmp_path):
    client = collector_app(tmp_path, rate_limit_callback="2/minute").test_client()
    send(client, beacon_bytes(callback="CB-HOT"))
    send(client, beacon_bytes(callback="  CB-HOT "))

    wrapped = "http://ad.partner.gifshow.com/track/activate?callback=CB-HOT"
    assert send(client, beacon_bytes(callback=wrapped)).status_code == 429


def test_the_view_still_reads_the_body_the_limiter_read(tmp_path):
    app = collector_app(tmp_path, rate_limit_callback="5/minute")

    response = send(app.test_client(), beacon_bytes(callback="CB-BODY"))

    assert response.status_code == 202
    assert [row["callback"] for row in stored_events(app)] == ["CB-BODY"]


def test_forged_x_forwarded_for_is_ignored_without_trusted_proxies(tmp_path):
    client = collector_app(tmp_path, rate_limit_ip="2/minute").test_client()

    answers = [
        send(client, beacon_bytes(callback=f"CB-{n}"), **{"X-Forwarded-For": f"10.0.0.{n}"})
        for n in range(3)
    ]

    assert [response.status_code for response in answers] == [202, 202, 429]


def test_behind_one_proxy_only_the_address_it_appended_counts(tmp_path):
    client = collector_app(tmp_path, rate_limit_ip="2/minute", trusted_proxies="1").test_client()

    def via_proxy(forged: str, real: str):
        header = {"X-Forwarded-For": f"{forged}, {real}"}
        return send(client, beacon_bytes(callback=forged), "10.1.1.1", **header).status_code

    same_client = [via_proxy(f"203.0.113.{n}", "198.51.100.7") for n in range(3)]
    other_client = via_proxy("203.0.113.99", "198.51.100.8")

    assert same_client == [202, 202, 429]
    assert other_client == 202


def test_the_server_api_is_not_rate_limited(tmp_path):
    client = collector_app(tmp_path, rate_limit_ip="1/minute").test_client()

    answers = [
        client.post(API, json={"event_type": 9, "callback": f"CB-{n}"}, headers=AUTH).status_code
        for n in range(4)
    ]

    assert answers == [202, 202, 202, 202]


def test_flood_is_answered_429_across_three_gunicorn_workers(sqlite_url):
    # memory:// counters are per worker: one client gets at most workers x limit through.
    workers, limit, sent = 3, 5, 60
    env = {"KS_COLLECTOR_RATE_LIMIT_IP": f"{limit}/minute"}
    run_cli(["migrate"], env, database_url=sqlite_url)
    with WebProcess(env, workers=workers, threads=1, database_url=sqlite_url) as web:
        web.wait_for_workers()
        host = urlsplit(web.url).netloc
        statuses = []
        for n in range(sent):
            # A new connection each time, so the kernel spreads them over the workers.
            connection = http.client.HTTPConnection(host, timeout=10)
            connection.request("POST", "/collect", body=beacon_bytes(callback=f"CB-{n}"))
            statuses.append(connection.getresponse().status)
            connection.close()
        stored = run_cli(["events", "--limit", "1000", "--json"], env, database_url=sqlite_url)

    accepted = statuses.count(202)
    assert statuses.count(202) + statuses.count(429) == sent
    assert limit <= accepted <= workers * limit
    assert statuses.count(429) >= sent - workers * limit
    assert len(stored.stdout.splitlines()) == accepted


def test_memory_counters_need_no_timer_thread_and_forget_expired_windows(monkeypatch):
    from collector.web import limits

    clock = [1000.0]
    monkeypatch.setattr(limits.time, "time", lambda: clock[0])
    threads_before = threading.active_count()
    counters = limits.WindowCounters()

    assert [counters.incr("callback:a", 60) for _ in range(3)] == [1, 2, 3]
    assert counters.get("callback:a") == 3
    assert counters.get_expiry("callback:a") == 1060.0
    clock[0] = 1061.0
    assert counters.get("callback:a") == 0
    assert counters.incr("callback:b", 60) == 1
    assert set(counters._windows) == {"callback:b"}
    assert threading.active_count() == threads_before
