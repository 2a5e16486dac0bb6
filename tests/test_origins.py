"""Who may send tag events: page origins, public binds, browser-safe events and seen clicks."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import quote

import pytest

from collector.catalog import EVENT_TYPES
from collector.config import Config, ConfigError
from collector.server import check_bind_is_safe, is_loopback_bind
from collector.web.http import origin_allowed
from tests.hostile.apps import (
    CRM_TOKEN,
    beacon,
    beacon_bytes,
    collector_app,
    refused_count,
    stored_events,
)
from tests.support.processes import free_port, run_cli

ALLOWED_ORIGINS = "https://shop.example.com,*.example.org"


@pytest.fixture
def app(tmp_path):
    return collector_app(tmp_path, allowed_origins=ALLOWED_ORIGINS)


@pytest.fixture
def client(app):
    return app.test_client()


def post_from(client, origin: str | None, body: bytes | None = None, **headers: str):
    if origin is not None:
        headers["Origin"] = origin
    return client.post("/collect", data=body or beacon_bytes(), headers=headers)


# ---- the allowlist ----------------------------------------------------------------------------


def test_beacon_from_an_allowed_origin_is_accepted_with_cors_headers(client, app):
    response = post_from(client, "https://shop.example.com")

    assert response.status_code == 202
    assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example.com"
    assert response.headers["Vary"] == "Origin"
    assert len(stored_events(app)) == 1


def test_beacon_from_another_origin_is_refused_with_403_and_stores_nothing(client, app):
    before = refused_count("tag", "origin")

    response = post_from(client, "https://evil.example.net")

    assert response.status_code == 403
    assert response.get_json() == {
        "error": "origin_not_allowed",
        "message": "page origin https://evil.example.net is not in KS_COLLECTOR_ALLOWED_ORIGINS",
    }
    assert "Access-Control-Allow-Origin" not in response.headers
    assert stored_events(app) == []
    assert refused_count("tag", "origin") == before + 1


@pytest.mark.parametrize(
    "origin",
    [
        "http://shop.example.com",  # another scheme
        "https://shop.example.com:8443",  # another port
        "https://www.shop.example.com",  # a subdomain of an exact entry
        "https://shop.example.com.evil.net",  # the allowed name as a prefix
        "https://evilshop.example.com",
    ],
)
def test_exact_entry_allows_only_that_scheme_host_and_port(client, origin):
    assert post_from(client, origin).status_code == 403


@pytest.mark.parametrize("origin", ["https://a.example.org", "http://b.c.example.org:8080"])
def test_wildcard_entry_allows_every_subdomain(client, origin):
    response = post_from(client, origin)

    assert response.status_code == 202
    assert response.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize(
    "origin", ["https://example.org", "https://evilexample.org", "https://example.org.evil.net"]
)
def test_wildcard_entry_refuses_the_bare_domain_and_lookalikes(client, origin):
    assert post_from(client, origin).status_code == 403


def test_origin_comparison_ignores_case(client):
    assert post_from(client, "HTTPS://Shop.Example.COM").status_code == 202


def test_image_fallback_with_only_a_referer_is_judged_by_the_referer_origin(client, app):
    query = "/collect?d=" + quote(json.dumps(beacon("landing", "CB-IMG")))

    allowed = client.get(query, headers={"Referer": "https://shop.example.com/"})
    refused = client.get(query, headers={"Referer": "https://evil.example.net/landing?x=1"})

    assert allowed.status_code == 202
    assert allowed.get_json() == {"status": "recorded"}
    assert refused.status_code == 403
    assert refused.get_json()["message"] == (
        "page origin https://evil.example.net is not in KS_COLLECTOR_ALLOWED_ORIGINS"
    )


def test_full_referer_url_counts_only_for_its_origin(client):
    response = client.post(
        "/collect",
        data=beacon_bytes(),
        headers={"Referer": "https://shop.example.com/landing/page?callback=CB-1#top"},
    )

    assert response.status_code == 202


def test_beacon_with_neither_origin_nor_referer_is_refused(client):
    response = post_from(client, None)

    assert response.status_code == 403
    assert response.get_json()["message"] == (
        "page origin (none sent) is not in KS_COLLECTOR_ALLOWED_ORIGINS"
    )


def test_opaque_null_origin_is_judged_by_the_referer(client):
    # Sandboxed frames and no-referrer pages send "Origin: null"; only a Referer can vouch.
    with_referer = post_from(client, "null", Referer="https://shop.example.com/")
    without = post_from(client, "null")

    assert with_referer.status_code == 202
    assert without.status_code == 403


def test_preflight_gets_cors_headers_only_for_an_allowed_origin(client):
    allowed = client.options("/collect", headers={"Origin": "https://a.example.org"})
    other = client.options("/collect", headers={"Origin": "https://evil.example.net"})

    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://a.example.org"
    assert allowed.headers["Access-Control-Allow-Methods"] == "POST, GET, OPTIONS"
    assert other.status_code == 204
    assert "Access-Control-Allow-Origin" not in other.headers


def test_star_allowlist_takes_beacons_from_any_page(tmp_path):
    client = collector_app(tmp_path, allowed_origins="*").test_client()

    response = post_from(client, "https://anything.example.net")

    assert response.status_code == 202
    assert response.headers["Access-Control-Allow-Origin"] == "https://anything.example.net"


def test_without_an_allowlist_a_loopback_collector_takes_any_page(tmp_path):
    # Only possible on loopback: a public bind without an allowlist is refused (below).
    client = collector_app(tmp_path).test_client()

    assert post_from(client, "https://anything.example.net").status_code == 202
    assert post_from(client, None).status_code == 202


# ---- public binds -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["web", "serve"])
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_public_bind_without_an_allowlist_exits_at_once_without_listening(
    command, host, sqlite_url
):
    port = free_port()
    bind = f"{host}:{port}"
    started = time.monotonic()

    result = run_cli([command, "--bind", bind], database_url=sqlite_url, check=False, timeout=30)

    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert (
        f"refusing to listen on {bind} with no KS_COLLECTOR_ALLOWED_ORIGINS: anyone could post "
        "conversions for your landing pages." in result.stderr
    )
    assert "gunicorn" not in (result.stdout + result.stderr).lower()
    assert elapsed < 10
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    "bind",
    ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.1.2.3:8000", "unix:/tmp/ks.sock"],
)
def test_loopback_binds_need_no_allowlist(bind):
    assert is_loopback_bind(bind)
    check_bind_is_safe(bind, Config.from_env({}))


@pytest.mark.parametrize(
    "bind", ["0.0.0.0:8000", "[::]:8000", "192.0.2.10:8000", "collector.example.com:80", ":8000"]
)
def test_other_binds_are_public(bind):
    assert not is_loopback_bind(bind)
    with pytest.raises(SystemExit):
        check_bind_is_safe(bind, Config.from_env({}))


def test_public_bind_with_star_allowlist_starts_with_a_warning(caplog):
    caplog.set_level("WARNING", logger="ks_collector.server")

    check_bind_is_safe("0.0.0.0:8000", Config.from_env({}, allowed_origins="*"))

    assert [record.getMessage() for record in caplog.records] == [
        "KS_COLLECTOR_ALLOWED_ORIGINS is '*': tag events are accepted from any page on the internet"
    ]


def test_loopback_bind_with_star_allowlist_warns_too(caplog):
    caplog.set_level("WARNING", logger="ks_collector.server")

    check_bind_is_safe("127.0.0.1:8000", Config.from_env({}, allowed_origins="*"))

    assert [record.getMessage() for record in caplog.records] == [
        "KS_COLLECTOR_ALLOWED_ORIGINS is '*': tag events are accepted from any page on the internet"
    ]


@pytest.mark.parametrize(
    "entries",
    [
        "*",
        "*.example.org",
        "https://shop.example.com",
        "https://shop.example.com/",
        "http://127.0.0.1:18602",
        "https://*.example.org",
        "http://[::1]:8080",
        " https://a.example.com , *.example.org ",
    ],
)
def test_origin_entries_browsers_can_match_are_taken(entries):
    expected = tuple(entry.strip() for entry in entries.split(","))

    assert Config.from_env({"KS_COLLECTOR_ALLOWED_ORIGINS": entries}).allowed_origins == expected


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        (
            "127.0.0.1:18602",
            "'127.0.0.1:18602' is not an origin such as https://shop.example.com, *.example.com"
            " or * (did you mean https://127.0.0.1:18602?)",
        ),
        (
            "https://a.example.com,example.org",
            "'example.org' is not an origin such as https://shop.example.com, *.example.com"
            " or * (did you mean https://example.org?)",
        ),
        (
            "https://shop.example.com/landing",
            "'https://shop.example.com/landing' is not an origin such as"
            " https://shop.example.com, *.example.com or * (an origin has no path)",
        ),
        (
            "https://shop.example.com:443",
            "'https://shop.example.com:443' names the default port, which browsers leave out of"
            " the origin they send: write https://shop.example.com",
        ),
        (
            "ftp://files.example.com",
            "'ftp://files.example.com' is not an origin such as https://shop.example.com,"
            " *.example.com or *",
        ),
    ],
)
def test_origin_entries_no_page_could_match_are_refused_by_name(entries, reason):
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"KS_COLLECTOR_ALLOWED_ORIGINS": entries})

    assert str(refused.value) == f"KS_COLLECTOR_ALLOWED_ORIGINS={entries!r}: {reason}"


def test_serve_refuses_to_start_with_an_origin_missing_its_scheme(tmp_path):
    result = run_cli(
        ["serve", "--bind", f"127.0.0.1:{free_port()}"],
        {"KS_COLLECTOR_ALLOWED_ORIGINS": "shop.example.com"},
        database_url=f"sqlite:///{tmp_path}/ks.db",
        timeout=30,
        check=False,
    )

    assert result.returncode != 0
    assert "did you mean https://shop.example.com?" in result.stderr


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.org", True),
        ("https://b.a.example.org", True),
        ("https://example.org", False),
        ("http://a.example.org", False),
        ("https://a.example.org:8443", False),
        ("http://a.dev.example:8080", True),
        ("http://a.dev.example:8081", False),
        ("http://a.dev.example", False),
        # A netloc that ends like the pattern without its host doing so: forged, never sent by
        # a browser, and not let through.
        ("https://evil.example:1.example.org", False),
    ],
)
def test_scheme_wildcard_entries_match_host_and_port_apart(origin, allowed):
    entries = ("https://*.example.org", "http://*.dev.example:8080")

    assert origin_allowed(origin, entries) is allowed


def test_public_bind_with_an_allowlist_starts_silently(caplog):
    caplog.set_level("DEBUG", logger="ks_collector.server")

    check_bind_is_safe("0.0.0.0:8000", Config.from_env({}, allowed_origins=ALLOWED_ORIGINS))

    assert caplog.records == []


# ---- browser-safe events ----------------------------------------------------------------------


def test_payment_from_a_browser_beacon_is_refused_with_422(client, app):
    response = post_from(client, "https://shop.example.com", beacon_bytes("payment"))

    assert response.status_code == 422
    assert response.get_json() == {
        "error": "invalid_event",
        "message": "the beacon was refused",
        "fields": {
            "type": [
                "payment (3) cannot be reported from a browser; "
                "send it from your server through /api/v1/conversions"
            ]
        },
    }
    assert stored_events(app) == []


def test_only_browser_events_are_taken_from_beacons(client):
    answers = {
        event.code: post_from(
            client, "https://shop.example.com", beacon_bytes(str(event.code), f"CB-{event.code}")
        ).status_code
        for event in EVENT_TYPES
    }

    assert {code for code, status in answers.items() if status == 202} == {9, 51, 64, 138, 179}
    assert {status for status in answers.values() if status != 202} == {422}


# ---- seen clicks ------------------------------------------------------------------------------


def test_landing_beacon_is_recorded_and_never_queued(client, app):
    response = post_from(client, "https://shop.example.com", beacon_bytes("landing", "CB-L"))

    assert response.status_code == 202
    assert response.get_json() == {"status": "recorded"}
    assert stored_events(app) == []
    assert app.config["KS_STORE"].has_landing("CB-L")


def test_by_default_an_event_for_a_never_landed_click_is_accepted(client):
    response = post_from(client, "https://shop.example.com", beacon_bytes("form", "CB-NEW"))

    assert response.status_code == 202


def test_required_landing_refuses_an_event_for_a_never_landed_click(tmp_path):
    app = collector_app(tmp_path, require_landing="true")
    before = refused_count("tag", "no_landing")

    response = app.test_client().post("/collect", data=beacon_bytes("form", "CB-UNSEEN"))

    assert response.status_code == 422
    assert response.get_json() == {
        "error": "unknown_click",
        "message": "this click id was never seen landing on a page with the tag",
        "fields": {"callback": ["was never reported by a landing beacon"]},
    }
    assert stored_events(app) == []
    assert refused_count("tag", "no_landing") == before + 1


def test_required_landing_accepts_an_event_once_its_click_landed(tmp_path):
    app = collector_app(tmp_path, require_landing="true")
    client = app.test_client()

    landing = client.post("/collect", data=beacon_bytes("landing", "CB-SEEN"))
    event = client.post("/collect", data=beacon_bytes("form", "CB-SEEN"))

    assert (landing.status_code, event.status_code) == (202, 202)
    assert [row["callback"] for row in stored_events(app)] == ["CB-SEEN"]


def test_required_landing_does_not_apply_to_the_server_api(tmp_path):
    app = collector_app(tmp_path, require_landing="true")

    response = app.test_client().post(
        "/api/v1/conversions",
        json={"event_type": "payment", "callback": "CB-CRM", "purchase_amount": "9.90"},
        headers={"Authorization": f"Bearer {CRM_TOKEN}"},
    )

    assert response.status_code == 202
