"""``/api/v1``: conversions from the advertiser's servers, the catalog listing and OpenAPI.

Flask's test client against a real store file (and, where the store's SQL decides the outcome,
a real PostgreSQL database too). What reaches Kuaishou is covered end to end in
tests/test_api_end_to_end.py.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections.abc import Iterator

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_openapi

from collector import catalog
from collector.config import Config
from collector.store import SqlStore, open_store
from collector.validation import ApiEventSchema, now_ms
from collector.web import create_app

TOKEN = "crm-token-0123456789abcdef"
OTHER_TOKEN = "shop-token-fedcba9876543210"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Api:
    """A test client for one collector app, and the store behind it."""

    def __init__(self, database_url: str, **settings: str) -> None:
        self.store: SqlStore = open_store(database_url)
        self.store.migrate()
        settings.setdefault("api_tokens", f"crm:{TOKEN},shop:{OTHER_TOKEN}")
        config = Config.from_env({}, database_url=database_url, **settings)
        self.client = create_app(config, self.store).test_client()

    def post(self, body, headers=AUTH):
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.client.post(
            "/api/v1/conversions", data=data, headers=headers, content_type="application/json"
        )

    def beacon(self, **fields):
        """What static/tag.js sends: a text/plain POST of a JSON object."""
        body = {"v": 1, "id": now_hex(), "age_ms": 0, **fields}
        return self.client.post(
            "/collect", data=json.dumps(body), content_type="text/plain;charset=UTF-8"
        )

    def rows(self) -> list[dict]:
        """Stored events, oldest first."""
        return list(reversed(self.store.list_events(limit=10_000)))


_hex_counter = iter(range(1, 1_000_000))


def now_hex() -> str:
    return f"{next(_hex_counter):032x}"


@pytest.fixture
def api(sqlite_url) -> Iterator[Api]:
    api = Api(sqlite_url)
    yield api
    api.store.close()


@pytest.fixture
def any_api(database_url) -> Iterator[Api]:
    """The same, once on SQLite and once on PostgreSQL."""
    api = Api(database_url)
    yield api
    api.store.close()


def accepted(response) -> list[dict]:
    assert response.status_code == 202, response.get_json()
    return response.get_json()["results"]


# ---- authentication and body -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "send Authorization: Bearer <token>"),
        ({"Authorization": TOKEN}, "send Authorization: Bearer <token>"),
        ({"Authorization": f"Basic {TOKEN}"}, "send Authorization: Bearer <token>"),
        ({"Authorization": "Bearer "}, "send Authorization: Bearer <token>"),
        ({"Authorization": "Bearer crm-token-0123456789abcdeX"}, "the bearer token is not valid"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "the bearer token is not valid"),
    ],
)
def test_conversions_without_a_valid_token_are_401(api, headers, message):
    response = api.post({"event_type": 9, "callback": "CLICK-1"}, headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {"error": "unauthorized", "message": message}
    assert api.rows() == []


def test_every_configured_token_is_accepted(api):
    headers = {"Authorization": f"bearer {OTHER_TOKEN}"}
    assert accepted(api.post({"event_type": 9, "callback": "CLICK-1"}, headers=headers))


def test_api_is_off_without_tokens(sqlite_url):
    api = Api(sqlite_url, api_tokens="")
    response = api.post({"event_type": 9, "callback": "CLICK-1"})
    assert response.status_code == 401
    assert response.get_json()["error"] == "api_disabled"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"event_type=9&callback=CLICK-1", "the body is not valid JSON"),
        (b"", "the body is empty; send a JSON object"),
        (b'{"event_type": 9, "event_type": 3}', "duplicate key 'event_type' in JSON object"),
    ],
)
def test_a_body_that_is_not_json_is_400(api, body, message):
    response = api.post(body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_body"
    assert response.get_json()["message"].startswith(message)


# ---- accepting ---------------------------------------------------------------------------------


def test_one_event_is_committed_and_answered_202_with_its_id(api):
    body = {"event_type": "payment", "callback": "CLICK-1", "purchase_amount": 9.9}
    results = accepted(api.post({**body, "event_id": "order-1"}))

    [row] = api.rows()
    assert results == [{"index": 0, "status": "accepted", "id": row["id"], "event_id": "order-1"}]
    assert (row["event_type"], row["callback"], row["params"], row["source"], row["status"]) == (
        3,
        "CLICK-1",
        {"purchase_amount": "9.90"},
        "api",
        "pending",
    )


def test_event_without_event_time_is_stamped_when_received(api):
    before = now_ms()
    accepted(api.post({"event_type": 9, "callback": "CLICK-1"}))
    [row] = api.rows()
    assert before <= row["event_time_ms"] == row["received_at_ms"] <= now_ms()


def test_a_batch_is_committed_in_order_with_one_result_per_event(api):
    events = [
        {"event_type": 9, "callback": "CLICK-1", "event_id": "a"},
        {"event_type": "phone_contact_failed", "callback": "CLICK-2", "action_reason": 4},
        {"event_type": 3, "callback": "CLICK-3", "purchase_amount": "10", "event_id": "c"},
    ]
    results = accepted(api.post({"events": events}))

    rows = api.rows()
    assert [result["status"] for result in results] == ["accepted"] * 3
    assert [result["id"] for result in results] == [row["id"] for row in rows]
    assert [result["index"] for result in results] == [0, 1, 2]
    assert [(row["event_type"], row["callback"], row["params"]) for row in rows] == [
        (9, "CLICK-1", {}),
        (120, "CLICK-2", {"action_reason": "4"}),
        (3, "CLICK-3", {"purchase_amount": "10.00"}),
    ]


def test_a_batch_of_500_is_accepted(api):
    events = [{"event_type": 5, "callback": f"CLICK-{n}"} for n in range(500)]
    assert len(accepted(api.post({"events": events}))) == 500
    assert len(api.rows()) == 500


# ---- refusing: all or nothing ------------------------------------------------------------------


def test_a_refused_event_is_422_with_its_errors_by_field(api):
    response = api.post({"event_type": 3, "callback": "CLICK-1", "purchase_amount": "9.999"})
    assert response.status_code == 422
    assert response.get_json() == {
        "error": "invalid_events",
        "message": "1 of 1 events refused; nothing was stored",
        "events": [
            {
                "index": 0,
                "errors": {
                    "purchase_amount": ["has more than two decimals (the unit is yuan, not fen)"]
                },
            }
        ],
    }


def test_a_batch_with_one_bad_event_stores_nothing(any_api):
    events = [
        {"event_type": 9, "callback": "CLICK-1"},
        {"event_type": 120, "callback": "CLICK-2", "action_reason": 9},
        {"event_type": 2, "callback": "CLICK-3"},
        {"event_type": 3, "callback": "CLICK-4"},
    ]
    response = any_api.post({"events": events})

    assert response.status_code == 422
    assert response.get_json() == {
        "error": "invalid_events",
        "message": "2 of 4 events refused; nothing was stored",
        "events": [
            {"index": 1, "errors": {"action_reason": ["must be between 1 and 5"]}},
            {"index": 3, "errors": {"purchase_amount": ["is required for event_type 3 (payment)"]}},
        ],
    }
    assert any_api.rows() == []


def test_a_batch_item_that_is_not_an_object_is_refused_by_index(api):
    response = api.post({"events": [{"event_type": 9, "callback": "CLICK-1"}, "form", None]})
    assert response.status_code == 422
    assert response.get_json()["events"] == [
        {"index": 1, "errors": {"_schema": ["an event must be a JSON object"]}},
        {"index": 2, "errors": {"_schema": ["an event must be a JSON object"]}},
    ]
    assert api.rows() == []


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"events": []}, {"events": ["must hold 1 to 500 events; split larger batches"]}),
        (
            {"events": [{"event_type": 5, "callback": f"C-{n}"} for n in range(501)]},
            {"events": ["must hold 1 to 500 events; split larger batches"]},
        ),
        ({"events": {"event_type": 9}}, {"events": ["Not a valid list."]}),
        (
            {"events": [{"event_type": 9, "callback": "C"}], "token": "x"},
            {"token": ["is not a field this endpoint accepts"]},
        ),
    ],
)
def test_a_malformed_batch_is_422_and_stores_nothing(api, body, fields):
    response = api.post(body)
    assert response.status_code == 422
    assert response.get_json() == {
        "error": "invalid_batch",
        "message": "the batch was refused",
        "fields": fields,
    }
    assert api.rows() == []


def test_a_store_failure_half_way_through_a_batch_leaves_nothing_written(api, sqlite_url):
    # A trigger makes the database itself fail on the third insert, after two have succeeded
    # inside the batch's transaction.
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as connection:
        connection.execute(
            "CREATE TRIGGER fail_third BEFORE INSERT ON events WHEN NEW.event_id = 'third'"
            " BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
        )
    events = [
        {"event_type": 9, "callback": "CLICK-1", "event_id": "first"},
        {"event_type": 9, "callback": "CLICK-2", "event_id": "second"},
        {"event_type": 9, "callback": "CLICK-3", "event_id": "third"},
    ]
    response = api.post({"events": events})

    assert response.status_code == 500
    assert response.get_json() == {
        "error": "internal_error",
        "message": "an unexpected error occurred",
    }
    assert api.rows() == []


# ---- once means once ---------------------------------------------------------------------------


def test_a_repeated_event_id_is_a_duplicate_of_the_first(any_api):
    body = {"event_type": 3, "callback": "CLICK-1", "purchase_amount": 5, "event_id": "order-7"}
    [first] = accepted(any_api.post(body))
    [again] = accepted(any_api.post({**body, "purchase_amount": 6}))

    assert again == {"index": 0, "status": "duplicate", "id": first["id"], "event_id": "order-7"}
    assert [row["params"] for row in any_api.rows()] == [{"purchase_amount": "5.00"}]


def test_a_repeated_event_id_inside_one_batch_is_a_duplicate(api):
    event = {"event_type": 6, "callback": "CLICK-1", "event_id": "q-1"}
    first, second = accepted(api.post({"events": [event, event]}))
    assert (first["status"], second["status"], second["id"]) == (
        "accepted",
        "duplicate",
        first["id"],
    )
    assert len(api.rows()) == 1


def test_registration_is_stored_once_per_callback(any_api):
    [first] = accepted(any_api.post({"event_type": "registration", "callback": "CLICK-1"}))
    [again] = accepted(any_api.post({"event_type": 2, "callback": "CLICK-1", "event_id": "other"}))
    [elsewhere] = accepted(any_api.post({"event_type": 2, "callback": "CLICK-2"}))

    assert (again["status"], again["id"]) == ("duplicate", first["id"])
    assert elsewhere["status"] == "accepted"
    assert [row["callback"] for row in any_api.rows()] == ["CLICK-1", "CLICK-2"]


def test_payment_may_repeat_for_one_callback(api):
    for amount in (5, 5, 8):
        body = {"event_type": 3, "callback": "CLICK-1", "purchase_amount": amount}
        assert accepted(api.post(body))[0]["status"] == "accepted"
    assert len(api.rows()) == 3


def test_a_form_from_the_tag_then_the_api_is_stored_once(api):
    tag = api.beacon(type="form", callback="CLICK-1")
    assert tag.status_code == 202
    [from_api] = accepted(api.post({"event_type": "form", "callback": "CLICK-1"}))

    assert (from_api["status"], from_api["id"]) == ("duplicate", tag.get_json()["id"])
    assert [row["source"] for row in api.rows()] == ["tag"]


def test_a_bare_array_is_refused_with_the_shape_to_send(api):
    response = api.post([{"event_type": 9, "callback": "CLICK-1"}])

    assert response.status_code == 422
    assert response.get_json() == {
        "error": "invalid_batch",
        "message": 'send one event as a JSON object, or several as {"events": [...]}, '
        "not a bare array",
    }
    assert api.rows() == []


def test_a_compressed_body_is_refused_as_unsupported_not_as_bad_text(api):
    response = api.client.post(
        "/api/v1/conversions",
        data=gzip.compress(b'{"event_type": 9, "callback": "CLICK-1"}'),
        headers={**AUTH, "Content-Encoding": "gzip"},
        content_type="application/json",
    )

    assert response.status_code == 415
    assert response.get_json() == {
        "error": "unsupported_content_encoding",
        "message": "Content-Encoding gzip is not accepted: send the JSON uncompressed",
    }
    assert api.rows() == []


def test_a_beacon_cannot_take_the_event_id_of_an_api_conversion(any_api):
    # /collect is public: a beacon naming a CRM's order number must not turn the payment
    # reported later under that number into a duplicate that is never relayed.
    tag = any_api.beacon(id="order-10087", type="form", callback="FORGED-CB")
    payment = {"event_type": 3, "callback": "REAL-CB", "purchase_amount": 99}
    [from_api] = accepted(any_api.post({**payment, "event_id": "order-10087"}))

    assert (tag.status_code, tag.get_json()["event_id"]) == (202, "order-10087")
    assert (from_api["status"], from_api["event_id"]) == ("accepted", "order-10087")
    assert [(row["source"], row["event_id"], row["callback"]) for row in any_api.rows()] == [
        ("tag", "tag:order-10087", "FORGED-CB"),
        ("api", "order-10087", "REAL-CB"),
    ]


def test_an_api_event_id_may_not_start_with_the_tag_prefix(api):
    response = api.post({"event_type": 9, "callback": "CLICK-1", "event_id": "tag:order-1"})

    assert response.status_code == 422
    assert response.get_json()["events"] == [
        {"index": 0, "errors": {"event_id": ["must not start with 'tag:': kept for tag beacons"]}}
    ]
    assert api.rows() == []


def test_once_per_callback_types_follow_the_setting(sqlite_url):
    api = Api(sqlite_url, once_per_callback="2")
    for _ in range(2):
        accepted(api.post({"event_type": 9, "callback": "CLICK-1"}))
        accepted(api.post({"event_type": 2, "callback": "CLICK-1"}))
    assert [row["event_type"] for row in api.rows()] == [9, 2, 9]


# ---- lead ids ----------------------------------------------------------------------------------


def test_a_lead_id_from_the_tag_resolves_to_its_callback(any_api):
    assert any_api.beacon(type="form", callback="CLICK-77", lead_id="L-1001").status_code == 202
    [result] = accepted(any_api.post({"event_type": "deal", "lead_id": "L-1001"}))

    row = next(row for row in any_api.rows() if row["id"] == result["id"])
    assert (row["event_type"], row["callback"], row["lead_id"]) == (119, "CLICK-77", "L-1001")


def test_an_unknown_lead_id_is_422_and_the_batch_stores_nothing(any_api):
    events = [
        {"event_type": 9, "callback": "CLICK-1"},
        {"event_type": "deal", "lead_id": "L-404"},
    ]
    response = any_api.post({"events": events})
    assert response.status_code == 422
    assert response.get_json()["events"] == [
        {
            "index": 1,
            "errors": {"lead_id": ["L-404 is unknown: no tag event has carried this lead id"]},
        }
    ]
    assert any_api.rows() == []


# ---- the tag endpoint refuses server-only events -----------------------------------------------


@pytest.mark.parametrize("event_type", ["payment", "registration", "3", "deal", "key_action"])
def test_collect_refuses_events_a_browser_may_not_send(api, event_type):
    response = api.beacon(type=event_type, callback="CLICK-1")

    found = catalog.lookup(event_type)
    assert response.status_code == 422
    assert response.get_json() == {
        "error": "invalid_event",
        "message": "the beacon was refused",
        "fields": {
            "type": [
                f"{found.name} ({found.code}) cannot be reported from a browser; "
                "send it from your server through /api/v1/conversions"
            ]
        },
    }
    assert api.rows() == []


@pytest.mark.parametrize("event_type", ["form", "payment_page_view", "wechat_copy", "138", "179"])
def test_collect_accepts_browser_events(api, event_type):
    response = api.beacon(type=event_type, callback="CLICK-1")
    assert response.status_code == 202
    assert response.get_json()["status"] == "accepted"


# ---- the catalog listing -----------------------------------------------------------------------


def test_event_types_lists_the_whole_catalog(api):
    response = api.client.get("/api/v1/event-types")
    assert response.status_code == 200
    listed = response.get_json()["event_types"]
    assert [row["code"] for row in listed] == [event.code for event in catalog.EVENT_TYPES]
    assert listed[2] == catalog.BY_CODE[3].to_json(frozenset({1, 2, 7, 8, 9, 64, 181}))
    assert [row["code"] for row in listed if row["once_per_callback"]] == [1, 2, 7, 8, 9, 64, 181]


# ---- OpenAPI -----------------------------------------------------------------------------------


@pytest.fixture
def openapi(api) -> dict:
    response = api.client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def request_validator(document: dict) -> OAS30Validator:
    """A validator for the conversions request body, its ``$ref`` s resolved in ``document``."""
    post = document["paths"]["/api/v1/conversions"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    return OAS30Validator({**schema, "components": document["components"]})


def test_openapi_document_is_valid_openapi_3(openapi):
    validate_openapi(openapi)
    assert openapi["openapi"] == "3.0.3"
    assert set(openapi["paths"]) == {"/api/v1/conversions", "/api/v1/event-types"}


def test_openapi_event_schema_is_generated_from_the_marshmallow_schema(openapi):
    event = openapi["components"]["schemas"]["ConversionEvent"]
    assert list(event["properties"]) == list(ApiEventSchema().fields)
    assert event["required"] == ["event_type"]
    assert event["additionalProperties"] is False
    codes = event["properties"]["event_type"]["oneOf"][0]["enum"]
    assert codes == [event_type.code for event_type in catalog.EVENT_TYPES]


def test_openapi_describes_the_bodies_the_api_accepts(openapi):
    validator = request_validator(openapi)
    single = {"event_type": "payment", "callback": "CLICK-1", "purchase_amount": "9.90"}
    batch = {"events": [single, {"event_type": 120, "lead_id": "L-1", "action_reason": 4}]}
    assert list(validator.iter_errors(single)) == []
    assert list(validator.iter_errors(batch)) == []
    assert not validator.is_valid({**single, "amount": 9.9})
    assert not validator.is_valid({"events": []})
    assert not validator.is_valid({"event_type": "purchase", "callback": "CLICK-1"})


def response_validator(document: dict, path: str, method: str, status: str) -> OAS30Validator:
    operation = document["paths"][path][method]
    schema = operation["responses"][status]["content"]["application/json"]["schema"]
    return OAS30Validator({**schema, "components": document["components"]})


def test_event_types_answer_matches_its_documented_schema(api, openapi):
    validator = response_validator(openapi, "/api/v1/event-types", "get", "200")
    assert list(validator.iter_errors(api.client.get("/api/v1/event-types").get_json())) == []


def test_conversion_answers_match_their_documented_schemas(api, openapi):
    ok = api.post({"event_type": 9, "callback": "CLICK-1"})
    refused = api.post({"events": [{"event_type": 3, "callback": "CLICK-2"}]})
    malformed = api.post({"events": []})
    path = "/api/v1/conversions"

    assert (ok.status_code, refused.status_code, malformed.status_code) == (202, 422, 422)
    accepted_schema = response_validator(openapi, path, "post", "202")
    error_schema = response_validator(openapi, path, "post", "422")
    assert list(accepted_schema.iter_errors(ok.get_json())) == []
    assert list(error_schema.iter_errors(refused.get_json())) == []
    assert list(error_schema.iter_errors(malformed.get_json())) == []


def test_openapi_documents_every_answer_of_the_conversions_endpoint(openapi):
    post = openapi["paths"]["/api/v1/conversions"]["post"]
    assert set(post["responses"]) == {"202", "400", "401", "413", "415", "422", "503"}
    assert post["security"] == [{"bearer": []}]
