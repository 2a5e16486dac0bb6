"""What the collector keeps about visitors: no addresses stored, no whole click ids logged."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request

from tests.hostile.apps import CRM_TOKEN
from tests.support.processes import CollectorServer, WebProcess, run_cli

# A visitor's address as our (one, trusted) proxy reports it.
VISITOR_ADDRESS = "203.0.113.77"
# Click ids long enough that a log line holding one whole would be noticed.
CALLBACKS = {
    "ok": "OKCLICK-" + "a1b2c3d4" * 8,
    "decode_failure": "BADCLICK-" + "e5f6a7b8" * 8,
    "close": "DROPCLICK-" + "c9d0e1f2" * 8,
}


def send(url: str, body: dict, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def every_stored_text(database_path: str) -> list[str]:
    """Every value of every row of every table, as text."""
    with sqlite3.connect(database_path) as connection:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return [
            str(value)
            for table in tables
            for row in connection.execute(f'SELECT * FROM "{table}"')
            for value in row
        ]


def test_the_store_keeps_no_visitor_address(tmp_path):
    database = tmp_path / "ks.db"
    url = f"sqlite:///{database}"
    env = {
        "KS_COLLECTOR_TRUSTED_PROXIES": "1",
        "KS_COLLECTOR_API_TOKENS": f"crm:{CRM_TOKEN}",
        "KS_COLLECTOR_REQUIRE_LANDING": "true",
    }
    run_cli(["migrate"], env, database_url=url)
    via_proxy = {"X-Forwarded-For": VISITOR_ADDRESS, "Content-Type": "text/plain"}
    with WebProcess(env, workers=1, database_url=url) as web:
        statuses = [
            send(
                web.url + "/collect",
                {"v": 1, "id": "e1", "type": "landing", "callback": "CB-P"},
                via_proxy,
            ),
            send(
                web.url + "/collect",
                {"v": 1, "id": "e2", "type": "form", "callback": "CB-P", "lead_id": "L-1"},
                via_proxy,
            ),
            send(
                web.url + "/collect",
                {"v": 1, "id": "e3", "type": "form", "callback": "CB-X"},
                via_proxy,
            ),
            send(
                web.url + "/api/v1/conversions",
                {"event_type": "valid_lead", "lead_id": "L-1"},
                {
                    "Authorization": f"Bearer {CRM_TOKEN}",
                    "X-Forwarded-For": VISITOR_ADDRESS,
                    "Content-Type": "application/json",
                },
            ),
        ]

    stored = every_stored_text(str(database))
    assert statuses == [202, 202, 422, 202]
    assert "CB-P" in stored and "L-1" in stored  # the store was written to
    assert not [value for value in stored if VISITOR_ADDRESS in value or "127.0.0.1" in value]


def test_logs_show_click_ids_shortened_to_a_prefix(mock_kuaishou, sqlite_url):
    mock_kuaishou.set_mode(callback_modes={"BADCLICK": "decode_failure", "DROPCLICK": "close"})
    env = {
        "KS_COLLECTOR_API_TOKENS": f"crm:{CRM_TOKEN}",
        "KS_COLLECTOR_LOG_LEVEL": "DEBUG",
        "KS_COLLECTOR_RETRY_BASE_SECONDS": "60",
    }
    with CollectorServer(env, database_url=sqlite_url, upstream_url=mock_kuaishou.url) as server:
        batch = {"events": [{"event_type": "form", "callback": c} for c in CALLBACKS.values()]}
        api = {"Authorization": f"Bearer {CRM_TOKEN}", "Content-Type": "application/json"}
        assert send(server.url + "/api/v1/conversions", batch, api) == 202
        mock_kuaishou.wait_for_requests(len(CALLBACKS))
        deadline = time.monotonic() + 10
        while "rejected by Kuaishou" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.terminate()
        log = server.log_text()

    assert "(form, callback OKCLICK-…) delivered" in log
    assert "(form, callback BADCLICK…) rejected by Kuaishou: callbackinfo decodedfailure" in log
    assert "(form, callback DROPCLIC…) attempt 1 failed" in log
    for callback in CALLBACKS.values():
        assert callback not in log
        assert callback[:12] not in log
