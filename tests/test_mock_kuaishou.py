"""The mock Kuaishou endpoint behaves as the fault and relay tests rely on."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.mock_kuaishou import MockKuaishou

ROOT = Path(__file__).resolve().parent.parent

# A conversion as the relay sends it.
QUERY = {"callback": "CLICK-1", "event_type": "9", "event_time": "1767225600000"}


def call(mock: MockKuaishou, callback: str = "CLICK-1", **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", 5)
    return requests.get(mock.url, params={**QUERY, "callback": callback}, **kwargs)


def test_ok_answers_result_1_and_records_the_call(mock_kuaishou):
    before_ms = int(time.time() * 1000)

    response = requests.get(mock_kuaishou.url + "?callback=a%2Bb%3D&event_type=9&extra=", timeout=5)

    assert response.status_code == 200
    assert response.json() == {"result": 1}
    [record] = mock_kuaishou.requests()
    assert record["query"] == "callback=a%2Bb%3D&event_type=9&extra="
    assert record["params"] == {"callback": ["a+b="], "event_type": ["9"], "extra": [""]}
    assert record["method"] == "GET"
    assert record["outcome"] == "ok"
    assert before_ms <= record["received_ms"] <= int(time.time() * 1000)


def test_keep_alive_connections_are_reused(mock_kuaishou):
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(mock_kuaishou.url, params=QUERY, timeout=5).json() == {"result": 1}

    assert len({record["connection"] for record in mock_kuaishou.requests()}) == 1


def test_http_503(mock_kuaishou):
    mock_kuaishou.set_mode("http_503")

    assert call(mock_kuaishou).status_code == 503
    assert mock_kuaishou.requests()[0]["outcome"] == "http_503"


def test_http_500(mock_kuaishou):
    mock_kuaishou.set_mode("http_500")

    assert call(mock_kuaishou).status_code == 500


def test_http_429_carries_retry_after(mock_kuaishou):
    mock_kuaishou.set_mode("http_429", retry_after=30)

    response = call(mock_kuaishou)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "30"


def test_html_is_a_200_proxy_error_page(mock_kuaishou):
    mock_kuaishou.set_mode("html")

    response = call(mock_kuaishou)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()


def test_decode_failure_is_the_documented_body(mock_kuaishou):
    mock_kuaishou.set_mode("decode_failure")

    response = call(mock_kuaishou)

    assert response.status_code == 200
    assert response.json() == {
        "result": 0,
        "error_msg": "callbackinfo decodedfailure",
        "host-name": "mock",
    }


def test_hang_outlasts_the_client_timeout_but_is_recorded(mock_kuaishou):
    mock_kuaishou.set_mode("hang")

    with pytest.raises(requests.ReadTimeout):
        call(mock_kuaishou, timeout=0.3)

    assert len(mock_kuaishou.requests()) == 1


def test_hang_does_not_hold_up_other_connections(mock_kuaishou):
    mock_kuaishou.set_mode(callback_modes={"SLOW": "hang"})
    with socket.create_connection(("127.0.0.1", mock_kuaishou.port)) as hanging:
        hanging.sendall(b"GET /track/activate?callback=SLOW HTTP/1.1\r\nHost: x\r\n\r\n")
        mock_kuaishou.wait_for_requests(1)

        started = time.monotonic()
        assert call(mock_kuaishou).json() == {"result": 1}
        assert time.monotonic() - started < 1


def test_close_drops_the_connection_without_an_answer(mock_kuaishou):
    mock_kuaishou.set_mode("close")

    with pytest.raises(requests.ConnectionError):
        call(mock_kuaishou)

    # urllib3 does not retry a GET by default, so exactly one call arrived.
    assert len(mock_kuaishou.requests()) == 1


def test_latency_is_added_before_the_answer(mock_kuaishou):
    mock_kuaishou.set_mode(latency_ms=200)

    started = time.monotonic()
    call(mock_kuaishou)

    assert time.monotonic() - started >= 0.2


def test_fail_first_n_then_ok(mock_kuaishou):
    mock_kuaishou.set_mode("http_503", fail_first_n=2)

    statuses = [call(mock_kuaishou).status_code for _ in range(4)]

    assert statuses == [503, 503, 200, 200]


def test_a_new_mode_without_fail_first_n_applies_to_every_call(mock_kuaishou):
    mock_kuaishou.set_mode("http_503", fail_first_n=1)
    mock_kuaishou.set_mode("http_500")

    assert [call(mock_kuaishou).status_code for _ in range(2)] == [500, 500]


def test_changing_latency_keeps_the_fail_first_n_count(mock_kuaishou):
    mock_kuaishou.set_mode("http_503", fail_first_n=1)
    assert call(mock_kuaishou).status_code == 503

    mock_kuaishou.set_mode(latency_ms=1)

    assert call(mock_kuaishou).status_code == 200


def test_callback_prefix_override_wins_over_the_mode(mock_kuaishou):
    mock_kuaishou.set_mode("ok", callback_modes={"BAD": "decode_failure"})

    assert call(mock_kuaishou, "BAD-123").json()["result"] == 0
    assert call(mock_kuaishou, "GOOD-123").json()["result"] == 1


def test_unknown_mode_is_refused(mock_kuaishou):
    with pytest.raises(ValueError, match="unknown mode"):
        mock_kuaishou.set_mode("teapot")


def test_control_api_switches_modes_at_run_time(mock_kuaishou):
    control = mock_kuaishou.base_url + "/__control"

    answer = requests.post(control, json={"mode": "http_429", "retry_after": "7"}, timeout=5)

    assert answer.status_code == 200
    assert answer.json()["mode"] == "http_429"
    assert call(mock_kuaishou).headers["Retry-After"] == "7"


def test_control_api_refuses_an_unknown_mode(mock_kuaishou):
    answer = requests.post(mock_kuaishou.base_url + "/__control", json={"mode": "x"}, timeout=5)

    assert answer.status_code == 400
    assert "unknown mode" in answer.json()["error"]


def test_control_api_lists_requests_and_resets(mock_kuaishou):
    mock_kuaishou.set_mode("http_500")
    call(mock_kuaishou, "A")
    call(mock_kuaishou, "B")

    listed = requests.get(mock_kuaishou.base_url + "/__requests", timeout=5).json()
    assert [record["params"]["callback"] for record in listed] == [["A"], ["B"]]

    requests.post(mock_kuaishou.base_url + "/__reset", timeout=5)
    assert mock_kuaishou.requests() == []
    assert call(mock_kuaishou).status_code == 200


def test_stats_count_repeated_deliveries(mock_kuaishou):
    for callback in ("A", "B", "A"):
        call(mock_kuaishou, callback)

    stats = requests.get(mock_kuaishou.base_url + "/__stats", timeout=5).json()

    assert stats["count"] == 3
    assert stats["unique_callbacks"] == 2
    assert stats["duplicate_callbacks"] == {"A": 2}
    assert len(stats["duplicate_queries"]) == 1
    assert stats["by_outcome"] == {"ok": 3}


def test_other_paths_and_methods_are_not_conversions(mock_kuaishou):
    assert requests.get(mock_kuaishou.base_url + "/other", timeout=5).status_code == 404
    assert requests.post(mock_kuaishou.url, timeout=5).status_code == 405
    assert mock_kuaishou.requests()[0]["method"] == "POST"


def test_stopped_mock_refuses_connections_and_comes_back_on_the_same_port(mock_kuaishou):
    call(mock_kuaishou, "BEFORE")
    url = mock_kuaishou.url

    mock_kuaishou.stop()
    with pytest.raises(requests.ConnectionError):
        call(mock_kuaishou)

    assert mock_kuaishou.start() == url
    assert call(mock_kuaishou, "AFTER").json() == {"result": 1}
    assert [r["params"]["callback"][0] for r in mock_kuaishou.requests()] == ["BEFORE", "AFTER"]


def test_stop_drops_open_keep_alive_connections(mock_kuaishou):
    with requests.Session() as session:
        session.get(mock_kuaishou.url, params=QUERY, timeout=5)
        mock_kuaishou.stop()
        mock_kuaishou.start()

        # The pooled connection was closed by the server; urllib3 notices and opens a new one.
        session.get(mock_kuaishou.url, params=QUERY, timeout=5)

    assert [record["connection"] for record in mock_kuaishou.requests()] == [1, 2]


def test_hundreds_of_connections_wait_out_the_latency_together(mock_kuaishou):
    mock_kuaishou.set_mode(latency_ms=300)
    request = b"GET /track/activate?callback=C&event_type=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.create_connection(("127.0.0.1", mock_kuaishou.port)))
            for _ in range(300)
        ]
        started = time.monotonic()
        for sock in sockets:
            sock.sendall(request)
        for sock in sockets:
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
        elapsed = time.monotonic() - started

    # Served one after another this would take 90 s.
    assert elapsed < 2.5


def test_pipelined_requests_are_answered_in_order(mock_kuaishou):
    requests_ = b"".join(
        f"GET /track/activate?callback=P{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in range(3)
    )
    with socket.create_connection(("127.0.0.1", mock_kuaishou.port), timeout=5) as sock:
        sock.sendall(requests_)
        mock_kuaishou.wait_for_requests(3)

    assert [r["params"]["callback"][0] for r in mock_kuaishou.requests()] == ["P0", "P1", "P2"]


def test_runs_as_a_process_that_prints_its_url(tmp_path):
    record = tmp_path / "calls.jsonl"
    options = ["--port", "0", "--latency-ms", "5", "--record", str(record)]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.mock_kuaishou", *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/track/activate")
        base = url.removesuffix("/track/activate")

        for callback in ("X", "X", "Y"):
            assert requests.get(url, params={"callback": callback}, timeout=5).status_code == 200
        stats = requests.get(base + "/__stats", timeout=5).json()
        assert stats["count"] == 3
        assert stats["duplicate_callbacks"] == {"X": 2}

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["params"]["callback"] for line in lines] == [["X"], ["X"], ["Y"]]
