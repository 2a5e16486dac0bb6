"""What every answer carries, and what no answer ever carries: headers, and no internals."""

from __future__ import annotations

import json

import pytest

from collector.store import StoreUnavailable
from tests.hostile.apps import CRM_TOKEN, beacon_bytes, collector_app

AUTH = {"Authorization": f"Bearer {CRM_TOKEN}"}
# What an internal error says about itself, none of which may reach a client.
SECRET_DETAIL = "/srv/ks/collector.py line 42: password=hunter2 postgresql://ks:pw@db/ks"

API_CSP = "default-src 'none'; frame-ancestors 'none'"


@pytest.fixture
def app(tmp_path):
    return collector_app(
        tmp_path,
        allowed_origins="https://shop.example.com",
        rate_limit_ip="1000/minute",
        rate_limit_callback="1/minute",
        admin_token="admin-token-0123456789",
    )


def every_kind_of_answer(client) -> dict[str, object]:
    """One request for each endpoint and each way it can answer."""
    page = {"Origin": "https://shop.example.com"}
    return {
        "collect 202": client.post("/collect", data=beacon_bytes(callback="A"), headers=page),
        "collect 429": client.post("/collect", data=beacon_bytes(callback="A"), headers=page),
        "collect 400": client.post("/collect", data=b"{", headers=page),
        "collect 403": client.post("/collect", data=beacon_bytes(), headers={"Origin": "x"}),
        "collect 413": client.post("/collect", data=b" " * 9000, headers=page),
        "collect 422": client.post("/collect", data=b"{}", headers=page),
        "collect 204": client.options("/collect", headers=page),
        "collect 405": client.put("/collect", headers=page),
        "api 202": client.post(
            "/api/v1/conversions", json={"event_type": 9, "callback": "B"}, headers=AUTH
        ),
        "api 401": client.post("/api/v1/conversions", json={}),
        "api 422": client.post("/api/v1/conversions", json={}, headers=AUTH),
        "api event types": client.get("/api/v1/event-types"),
        "api openapi": client.get("/api/v1/openapi.json"),
        "tag.js": client.get("/tag.js"),
        "demo": client.get("/demo"),
        "healthz": client.get("/healthz"),
        "readyz 503": client.get("/readyz"),
        "metrics": client.get("/metrics"),
        "admin": client.get("/admin"),
        "404": client.get("/no/such/page"),
    }


def test_every_answer_carries_the_security_headers(app):
    answers = every_kind_of_answer(app.test_client())

    for name, response in answers.items():
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["Referrer-Policy"] == "strict-origin-when-cross-origin", name
        if response.mimetype == "text/html":
            assert headers["X-Frame-Options"] == "DENY", name
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], name
        else:
            assert headers["Content-Security-Policy"] == API_CSP, name


def test_the_requests_above_got_the_answers_they_are_named_for(app):
    answers = every_kind_of_answer(app.test_client())

    for name, response in answers.items():
        expected = name.split()[-1]
        if expected.isdigit():
            assert response.status_code == int(expected), name


def test_an_internal_error_answers_500_without_internals(app, caplog):
    def explode(*_args, **_kwargs):
        raise RuntimeError(SECRET_DETAIL)

    app.config["KS_STORE"].add_conversions = explode
    client = app.test_client()

    tag = client.post(
        "/collect", data=beacon_bytes(), headers={"Origin": "https://shop.example.com"}
    )
    api = client.post("/api/v1/conversions", json={"event_type": 9, "callback": "B"}, headers=AUTH)

    for response in (tag, api):
        assert response.status_code == 500
        assert response.get_json() == {
            "error": "internal_error",
            "message": "an unexpected error occurred",
        }
        body = response.get_data(as_text=True)
        assert "hunter2" not in body and "Traceback" not in body and "RuntimeError" not in body
    # The operator still gets the whole story, in the log.
    assert any("hunter2" in (record.exc_text or "") for record in caplog.records)


def test_an_unavailable_store_answers_503_without_its_error(app):
    def unavailable(*_args, **_kwargs):
        raise StoreUnavailable(SECRET_DETAIL)

    app.config["KS_STORE"].add_conversions = unavailable

    response = app.test_client().post(
        "/api/v1/conversions", json={"event_type": 9, "callback": "B"}, headers=AUTH
    )

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert "hunter2" not in response.get_data(as_text=True)
    assert json.loads(response.get_data())["error"] == "store_unavailable"


def test_method_not_allowed_says_which_methods_are(app):
    response = app.test_client().delete("/api/v1/conversions", headers=AUTH)

    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert sorted(response.headers["Allow"].split(", ")) == ["OPTIONS", "POST"]
