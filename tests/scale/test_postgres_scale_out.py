"""Scale-out on PostgreSQL: two collectors and three relays share one database.

20,000 events go in through both collectors; each must reach the mock Kuaishou exactly once,
and when one relay is SIGKILLed mid-run, only requests it had in flight may be repeated.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess, WebProcess, run_cli

EVENTS = 20_000
BATCH = 500
TOKEN = "scale-test-token-0123456789"
# Each relay keeps this many requests in flight: the most a SIGKILL can leave undecided.
RELAY_CONCURRENCY = 32
FIGURES = Path(__file__).resolve().parents[2] / "test-output" / "scale-figures.json"


def post_batches(collectors: list[WebProcess], run: str) -> None:
    """POST every event as payment batches, alternating between the collectors."""

    def post(batch_number: int) -> None:
        collector = collectors[batch_number % len(collectors)]
        events = [
            {
                "event_type": "payment",
                "callback": f"{run}-{batch_number}-{index}",
                "purchase_amount": "1.00",
                "event_id": f"{run}-{batch_number}-{index}",
            }
            for index in range(BATCH)
        ]
        response = requests.post(
            f"{collector.url}/api/v1/conversions",
            json={"events": events},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert response.status_code == 202, response.text
        assert all(result["status"] == "accepted" for result in response.json()["results"])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(post, range(EVENTS // BATCH)))


def wait_until_all_delivered(mock: MockKuaishou, run: str, timeout: float) -> dict[str, int]:
    """Callback → times received, once every one of the run's callbacks has arrived."""
    deadline = time.monotonic() + timeout
    while True:
        counts: dict[str, int] = {}
        for call in mock.requests():
            callback = call["params"]["callback"][0]
            if callback.startswith(f"{run}-"):
                counts[callback] = counts.get(callback, 0) + 1
        if len(counts) >= EVENTS or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def record_figures(scenario: str, counts: dict[str, int], **extra: int) -> dict[str, int]:
    figures = {
        "sent": EVENTS,
        "delivered": len(counts),
        "duplicated": sum(count - 1 for count in counts.values()),
        "lost": EVENTS - len(counts),
        **extra,
    }
    FIGURES.parent.mkdir(exist_ok=True)
    existing = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    existing[scenario] = figures
    FIGURES.write_text(json.dumps(existing, indent=2))
    print(f"{scenario}: {figures}")
    return figures


def start_cluster(postgres_url: str, mock: MockKuaishou, tmp_path: Path, env: dict[str, str]):
    run_cli(["migrate"], database_url=postgres_url)
    collectors = [
        WebProcess(
            env, workers=2, database_url=postgres_url, upstream_url=mock.url, log_dir=tmp_path
        ).start()
        for _ in range(2)
    ]
    relays = [
        RelayProcess(
            env, database_url=postgres_url, upstream_url=mock.url, log_dir=tmp_path
        ).start()
        for _ in range(3)
    ]
    return collectors, relays


def cluster_env(**extra: str) -> dict[str, str]:
    return {
        "KS_COLLECTOR_API_TOKENS": f"scale:{TOKEN}",
        "KS_COLLECTOR_RELAY_CONCURRENCY": str(RELAY_CONCURRENCY),
        "KS_COLLECTOR_RELAY_POLL_SECONDS": "0.1",
        **extra,
    }


def test_two_collectors_and_three_relays_deliver_20000_events_exactly_once(
    postgres_url: str, mock_kuaishou: MockKuaishou, tmp_path: Path
) -> None:
    collectors, relays = start_cluster(postgres_url, mock_kuaishou, tmp_path, cluster_env())
    started = time.monotonic()
    post_batches(collectors, "steady")
    counts = wait_until_all_delivered(mock_kuaishou, "steady", timeout=240)
    seconds = time.monotonic() - started
    for process in [*relays, *collectors]:
        process.terminate()

    figures = record_figures("postgres 2 collectors + 3 relays", counts, seconds=round(seconds))
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0


def test_a_relay_killed_mid_run_repeats_at_most_its_in_flight_requests(
    postgres_url: str, mock_kuaishou: MockKuaishou, tmp_path: Path
) -> None:
    env = cluster_env(KS_COLLECTOR_LEASE_SECONDS="3", KS_COLLECTOR_UPSTREAM_TIMEOUT_SECONDS="1.5")
    collectors, relays = start_cluster(postgres_url, mock_kuaishou, tmp_path, env)
    post_batches(collectors, "killed")
    deadline = time.monotonic() + 60
    while len(mock_kuaishou.requests()) < EVENTS // 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    relays[0].kill()
    counts = wait_until_all_delivered(mock_kuaishou, "killed", timeout=240)
    for process in [*relays[1:], *collectors]:
        process.terminate()

    figures = record_figures(
        "postgres, one of 3 relays SIGKILLed mid-run", counts, in_flight_limit=RELAY_CONCURRENCY
    )
    assert figures["lost"] == 0
    assert figures["duplicated"] <= RELAY_CONCURRENCY
