"""/metrics under gunicorn: counters of every worker and of the relay, summed, on every scrape.

The main scenario runs ``ks-collector serve --workers 3`` with single-threaded workers, sends
forms from six clients at once through the API until every worker has taken some, adds tag
beacons and refusals, lets the relay deliver everything to the mock Kuaishou (which refuses click
ids starting with ``BAD``), then scrapes /metrics repeatedly on fresh connections, so each scrape
may be answered by a different worker.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.store import open_store
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import (
    CollectorServer,
    HttpProcess,
    WebProcess,
    free_port,
    run_cli,
)

API_TOKEN = "crm-token-0123456789abcdef"
TAG_EVENTS = 3  # WeChat copies from the tag, delivered
SCRAPES = 10
EXPECTED_FAMILIES = {
    "ks_events_received": "counter",
    "ks_events_duplicate": "counter",
    "ks_events_refused": "counter",
    "ks_relay_attempts": "counter",
    "ks_upstream_latency_seconds": "histogram",
    "ks_delivery_latency_seconds": "histogram",
    "ks_store_up": "gauge",
    "ks_outbox_pending": "gauge",
    "ks_outbox_oldest_pending_age_seconds": "gauge",
    "ks_outbox_dead": "gauge",
    "ks_relay_heartbeat_age_seconds": "gauge",
}


# ---- talking to the collector ------------------------------------------------------------------


def call(process: HttpProcess, method: str, path: str, body: object = None, **headers: str):
    """One request on a fresh connection (so any worker may take it): (status, body text)."""
    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(process.url).port, timeout=10)
    data = body if isinstance(body, str | bytes | None) else json.dumps(body)
    connection.request(method, path, body=data, headers={"Connection": "close", **headers})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, text


def post_api(process: HttpProcess, event: dict) -> int:
    auth = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    return call(process, "POST", "/api/v1/conversions", event, **auth)[0]


def beacon(process: HttpProcess, body: object) -> int:
    return call(process, "POST", "/collect", body, **{"Content-Type": "text/plain"})[0]


@dataclass
class Scrape:
    """One parsed /metrics answer."""

    families: dict[str, str]  # name -> type
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
        matching = [
            value
            for sample, sample_labels, value in self.samples
            if sample == name and labels.items() <= sample_labels.items()
        ]
        return sum(matching)


def scrape(process: HttpProcess) -> Scrape:
    status, text = call(process, "GET", "/metrics")
    assert status == 200
    families, samples = {}, []
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        samples += [(s.name, s.labels, s.value) for s in family.samples]
    return Scrape(families, samples)


def worker_pids(process: HttpProcess) -> set[str]:
    """The workers that have answered API requests so far, from their log lines."""
    return set(re.findall(r"ks_collector\.api\[(\d+)\]: token crm", process.log_text()))


def send_forms_over_workers(process: HttpProcess, workers: int, timeout: float = 30) -> int:
    """Send forms, six clients at once, until ``workers`` workers have taken some; returns how
    many were sent.

    The harness only waits for one worker to answer /healthz; the others may still be loading
    the app and take nothing from a first burst, so bursts go on until enough have joined in.
    """
    sent = 0
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(6) as clients:
        while len(worker_pids(process)) < workers:
            assert time.monotonic() < deadline, f"only {worker_pids(process)} took events"
            forms = [{"event_type": "form", "callback": f"OK-{sent + n}"} for n in range(12)]
            assert set(clients.map(lambda event: post_api(process, event), forms)) == {202}
            sent += len(forms)
    return sent


def wait_for_scrape(process: HttpProcess, ready, timeout: float = 30) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(process)
        if ready(result):
            return result
        assert time.monotonic() < deadline, f"metrics did not reach the expected values: {result}"
        time.sleep(0.1)


# ---- the busy collector ------------------------------------------------------------------------


@dataclass
class Busy:
    server: CollectorServer
    forms: int  # forms sent through the API, all delivered


@pytest.fixture(scope="module")
def busy(tmp_path_factory) -> Iterator[Busy]:
    """``serve --workers 3`` after a round of traffic has been delivered and counted."""
    mock = MockKuaishou()
    mock.start()
    mock.set_mode(callback_modes={"BAD": "decode_failure"})
    database = f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'ks.db'}"
    env = {"KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}"}
    server = CollectorServer(
        env, workers=3, threads=1, database_url=database, upstream_url=mock.url
    ).start()

    forms = send_forms_over_workers(server, workers=3)
    assert post_api(server, {"event_type": "form", "callback": "BAD-1"}) == 202
    payment = {"event_type": "payment", "purchase_amount": "9.90", "callback": "OK-0"}
    assert post_api(server, payment | {"event_id": "e1"}) == 202
    assert post_api(server, payment | {"event_id": "e1"}) == 202
    assert post_api(server, {"event_type": "form"}) == 422
    for n in range(TAG_EVENTS):
        event = {"v": 1, "id": f"{n + 1:032x}", "type": "wechat_copy", "callback": f"TAG-{n}"}
        assert beacon(server, event | {"age_ms": 0}) == 202
    assert beacon(server, "this is not JSON") == 400
    assert beacon(server, "{") == 400

    relayed = forms + TAG_EVENTS + 2  # the forms, the copies, BAD-1 and the payment
    wait_for_scrape(server, lambda s: s.value("ks_relay_attempts_total") == relayed)
    yield Busy(server, forms)
    server.terminate()
    mock.stop()


def test_received_events_are_summed_across_workers_on_every_scrape(busy):
    totals = [
        (
            scrape(busy.server).value("ks_events_received_total", source="api", event_type="9"),
            scrape(busy.server).value("ks_events_received_total", source="tag", event_type="64"),
        )
        for _ in range(SCRAPES)
    ]

    assert len(worker_pids(busy.server)) == 3
    assert totals == [(busy.forms + 1, TAG_EVENTS)] * SCRAPES


def test_a_repeated_event_id_is_counted_as_duplicate(busy):
    metrics = scrape(busy.server)

    assert metrics.value("ks_events_received_total", source="api", event_type="3") == 1
    assert metrics.value("ks_events_duplicate_total", source="api", event_type="3") == 1
    assert metrics.value("ks_events_duplicate_total") == 1


def test_refusals_are_counted_by_source_and_reason(busy):
    metrics = scrape(busy.server)

    refused = {
        (labels["source"], labels["reason"]): value
        for name, labels, value in metrics.samples
        if name == "ks_events_refused_total"
    }
    assert refused == {("api", "invalid"): 1, ("tag", "malformed"): 2}


def test_relay_attempts_are_counted_by_event_type_and_outcome(busy):
    metrics = scrape(busy.server)

    attempts = {
        (labels["event_type"], labels["outcome"]): value
        for name, labels, value in metrics.samples
        if name == "ks_relay_attempts_total"
    }
    assert attempts == {
        ("9", "delivered"): busy.forms,
        ("9", "rejected"): 1,
        ("3", "delivered"): 1,
        ("64", "delivered"): TAG_EVENTS,
    }


def test_every_delivery_is_observed_in_the_latency_histograms(busy):
    metrics = scrape(busy.server)

    delivered = busy.forms + 1 + TAG_EVENTS
    assert metrics.value("ks_delivery_latency_seconds_count") == delivered
    assert metrics.value("ks_delivery_latency_seconds_bucket", le="+Inf") == delivered
    assert metrics.value("ks_upstream_latency_seconds_count") == delivered + 1
    assert 0 < metrics.value("ks_delivery_latency_seconds_sum") < 60 * delivered


def test_outbox_gauges_are_read_from_the_store(busy):
    metrics = scrape(busy.server)

    assert metrics.value("ks_store_up") == 1
    assert metrics.value("ks_outbox_pending") == 0
    assert metrics.value("ks_outbox_oldest_pending_age_seconds") == 0
    assert metrics.value("ks_outbox_dead") == 0
    assert 0 <= metrics.value("ks_relay_heartbeat_age_seconds") < 30


def test_every_scrape_parses_with_the_families_documented(busy):
    families = [scrape(busy.server).families for _ in range(SCRAPES)]

    for found in families:
        assert {name: found.get(name) for name in EXPECTED_FAMILIES} == EXPECTED_FAMILIES


# ---- web alone -----------------------------------------------------------------------------


def migrated(database_url: str) -> str:
    run_cli(["migrate"], database_url=database_url)
    return database_url


def test_pending_events_show_in_the_outbox_gauges_without_a_relay(sqlite_url):
    env = {"KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}"}
    with WebProcess(env, workers=2, database_url=migrated(sqlite_url)) as web:
        for n in range(3):
            assert post_api(web, {"event_type": "form", "callback": f"OK-{n}"}) == 202
        time.sleep(0.05)  # so the oldest event is measurably old
        metrics = scrape(web)

    assert metrics.value("ks_outbox_pending") == 3
    assert 0.05 <= metrics.value("ks_outbox_oldest_pending_age_seconds") < 30
    assert math.isnan(metrics.value("ks_relay_heartbeat_age_seconds"))
    assert metrics.value("ks_relay_attempts_total") == 0


def test_web_alone_sums_its_workers_counters(sqlite_url):
    env = {"KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}"}
    with WebProcess(env, workers=3, threads=1, database_url=migrated(sqlite_url)) as web:
        sent = send_forms_over_workers(web, workers=3)
        totals = [scrape(web).value("ks_events_received_total") for _ in range(SCRAPES)]

    assert totals == [sent] * SCRAPES


def test_web_alone_starts_from_an_empty_metrics_directory(sqlite_url, tmp_path):
    metrics_dir = tmp_path / "metrics"
    env = {
        "KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}",
        "KS_COLLECTOR_METRICS_DIR": str(metrics_dir),
    }
    database = migrated(sqlite_url)
    with WebProcess(env, workers=2, database_url=database) as first:
        assert post_api(first, {"event_type": "form", "callback": "OK-1"}) == 202
        assert scrape(first).value("ks_events_received_total") == 1
    assert list(metrics_dir.glob("counter_*.db"))

    with WebProcess(env, workers=2, database_url=database) as second:
        assert scrape(second).value("ks_events_received_total") == 0


def test_a_metrics_directory_with_other_files_loses_only_stale_metrics(sqlite_url, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "important.txt").write_text("precious")
    for stale in ("counter_999999.db", "gauge_livesum_999999.db", "histogram_999999.db"):
        (metrics_dir / stale).write_bytes(b"stale")
    env = {
        "KS_COLLECTOR_METRICS_DIR": str(metrics_dir),
        "KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}",
    }

    with WebProcess(env, workers=1, database_url=migrated(sqlite_url)) as web:
        assert post_api(web, {"event_type": "form", "callback": "KEEP-1"}) == 202
        assert scrape(web).value("ks_events_received_total") == 1

    assert (metrics_dir / "important.txt").read_text() == "precious"
    assert not list(metrics_dir.glob("*_999999.db"))


def test_a_metrics_directory_holding_the_outbox_is_refused_and_left_alone(tmp_path):
    database = migrated(f"sqlite:///{tmp_path / 'ks.db'}")
    env = {"KS_COLLECTOR_METRICS_DIR": str(tmp_path)}

    result = run_cli(
        ["web", "--bind", f"127.0.0.1:{free_port()}"],
        env,
        database_url=database,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"KS_COLLECTOR_METRICS_DIR={tmp_path} holds ks.db: give the metrics a directory of "
        "their own (prometheus_client reads every *.db file there as its own)"
    )
    assert open_store(database).schema_version() == 1


def test_a_metrics_directory_that_is_a_file_is_a_one_line_error(tmp_path):
    not_a_directory = tmp_path / "metrics"
    not_a_directory.write_text("a file")

    result = run_cli(
        ["web", "--bind", f"127.0.0.1:{free_port()}"],
        {"KS_COLLECTOR_METRICS_DIR": str(not_a_directory)},
        database_url=migrated(f"sqlite:///{tmp_path / 'ks.db'}"),
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"KS_COLLECTOR_METRICS_DIR={not_a_directory} cannot be used as a directory: File exists"
    )


def test_outbox_gauges_are_left_out_when_the_store_cannot_be_read(tmp_path):
    database = tmp_path / "ks.db"
    with WebProcess({}, workers=1, database_url=migrated(f"sqlite:///{database}")) as web:
        assert scrape(web).value("ks_store_up") == 1
        store = open_store(f"sqlite:///{database}")
        with store.transaction() as cursor:
            cursor.execute("DROP TABLE events")
        store.close()
        metrics = scrape(web)

    assert metrics.value("ks_store_up") == 0
    assert "ks_outbox_pending" not in metrics.families
