"""Logs: one line per event outcome naming the event, its type, the outcome and the reason;
plain text by default, one JSON object per line with KS_COLLECTOR_LOG_FORMAT=json; click ids
only ever shortened.

The end-to-end tests run ``ks-collector serve`` against the mock Kuaishou, which refuses click
ids starting with ``BAD``, and read what the whole process tree wrote.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import urllib.request

import pytest

from collector import logs
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import CollectorServer

API_TOKEN = "crm-token-0123456789abcdef"
# Long enough that a log line holding it whole would be easy to spot.
GOOD_CALLBACK = "GOODCLICK-" + "g" * 60
BAD_CALLBACK = "BADCLICK-" + "b" * 60
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"[\w.-]+\[\d+\]: .+$"
)


def post(server: CollectorServer, callback: str) -> int:
    """Send a form for ``callback``; returns the outbox id."""
    request = urllib.request.Request(
        server.url + "/api/v1/conversions",
        data=json.dumps({"event_type": "form", "callback": callback}).encode(),
        headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["results"][0]["id"]


def run_traffic(log_format: str, tmp_path) -> tuple[str, int, int]:
    """Serve, send one event Kuaishou takes and one it refuses; (log text, good id, bad id)."""
    with MockKuaishou() as mock:
        mock.set_mode(callback_modes={"BAD": "decode_failure"})
        env = {"KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}", "KS_COLLECTOR_LOG_FORMAT": log_format}
        database = f"sqlite:///{tmp_path / 'ks.db'}"
        with CollectorServer(env, database_url=database, upstream_url=mock.url) as server:
            good, bad = post(server, GOOD_CALLBACK), post(server, BAD_CALLBACK)
            deadline = time.monotonic() + 15
            while not all(f"event {i} " in server.log_text() for i in (good, bad)):
                assert time.monotonic() < deadline, "the relay never logged both events"
                time.sleep(0.05)
        # The harness writes the command line first; everything after it is the product's.
        return server.log_text().split("\n", 1)[1], good, bad


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[str, int, int]:
    return run_traffic("text", tmp_path_factory.mktemp("text-logs"))


@pytest.fixture(scope="module")
def json_run(tmp_path_factory) -> tuple[str, int, int]:
    return run_traffic("json", tmp_path_factory.mktemp("json-logs"))


def test_every_text_line_has_time_level_logger_and_pid(text_run):
    output, _, _ = text_run
    lines = output.splitlines()

    assert [line for line in lines if not TEXT_LINE.match(line)] == []
    assert any(" gunicorn.error[" in line for line in lines)


def test_a_text_line_says_which_event_was_rejected_and_why(text_run):
    output, _, bad = text_run

    [line] = [line for line in output.splitlines() if f"event {bad} " in line]
    assert " WARNING ks_collector.relay[" in line
    assert line.endswith(
        f"event {bad} (form, callback BADCLICK…) rejected by Kuaishou: callbackinfo decodedfailure"
    )


def test_a_text_line_says_which_event_was_delivered(text_run):
    output, good, _ = text_run

    [line] = [line for line in output.splitlines() if f"event {good} " in line]
    assert " INFO ks_collector.relay[" in line
    assert re.search(rf"event {good} \(form, callback GOODCLIC…\) delivered in \d+ ms$", line)


def test_every_json_line_is_one_object_with_the_common_fields(json_run):
    output, _, _ = json_run
    entries = [json.loads(line) for line in output.splitlines()]

    assert entries
    for entry in entries:
        assert {"time", "level", "logger", "pid", "message"} <= entry.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert {entry["logger"] for entry in entries} >= {
        "ks_collector.server",
        "ks_collector.relay",
        "gunicorn.error",
    }


def test_a_json_line_says_which_event_was_rejected_and_why(json_run):
    output, _, bad = json_run

    [entry] = [e for e in map(json.loads, output.splitlines()) if f"event {bad} " in e["message"]]
    assert (entry["level"], entry["logger"]) == ("warning", "ks_collector.relay")
    assert entry["message"] == (
        f"event {bad} (form, callback BADCLICK…) rejected by Kuaishou: callbackinfo decodedfailure"
    )


@pytest.mark.parametrize("run", ["text_run", "json_run"])
def test_logs_hold_click_ids_only_as_a_short_prefix(run, request):
    output, _, _ = request.getfixturevalue(run)

    assert GOOD_CALLBACK[:12] not in output
    assert BAD_CALLBACK[:12] not in output


def record(message: str, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("ks_collector.test")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, message, (), None, extra=extra
    )


def test_fields_given_as_extra_become_json_keys():
    line = logs.JsonFormatter().format(
        record("event 7 rejected", event=7, event_type="form", outcome="rejected", when=object)
    )

    entry = json.loads(line)
    assert entry["message"] == "event 7 rejected"
    assert (entry["event"], entry["event_type"], entry["outcome"]) == (7, "form", "rejected")
    assert entry["when"] == "<class 'object'>"


def test_an_unknown_format_falls_back_to_text(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure_logging("xml", "info")
        logging.getLogger("ks_collector.test").info("hello")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)

    assert re.fullmatch(r"\S+ \S+ INFO ks_collector\.test\[\d+\]: hello\n", stream.getvalue())
