"""Relay: deliveries per second of ONE ``ks-collector relay`` process draining a full outbox.

The store is filled with ``events`` pending conversions first; the relay is then started against
the mock Kuaishou (a process of its own, answering after ``latency_ms``). The rate counts from
the mock's first call to the moment the store shows every event delivered, so it includes
claiming, sending and recording each outcome, and excludes the relay's start-up.

The baseline is the relay's own Kuaishou client (``collector.kuaishou.KuaishouClient``) calling
the same mock from as many threads as the relay keeps requests in flight, with no store at all:
the most one process could deliver through that client and that mock.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import profiling
from bench.cpu import cpu_seconds
from bench.services import MockUpstream
from collector.config import Config
from collector.kuaishou import KuaishouClient
from collector.store import DueEvent, Outcome, open_store
from collector.validation import Conversion, now_ms
from tests.support.processes import RelayProcess, run_cli

# Conversions committed per transaction while filling the outbox.
PRELOAD_BATCH = 500

# Event type of the preloaded conversions: 3, a purchase, sent with its amount like the real ones.
PRELOAD_EVENT_TYPE = 3


@dataclass(frozen=True)
class RelayFigures:
    latency_ms: float
    events: int
    seconds: float
    upstream_calls: int
    duplicate_callbacks: int
    cpu_ms_per_event: float  # the relay process's CPU from its first call to the last record
    baseline_rate: float  # the relay's Kuaishou client alone against the same mock
    baseline_cpu_ms_per_call: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def preload(database_url: str, events: int) -> None:
    """Commit ``events`` pending conversions, each with its own click id."""
    store = open_store(database_url)
    run = uuid.uuid4().hex[:8]
    try:
        for first in range(0, events, PRELOAD_BATCH):
            at = now_ms()
            batch = [
                Conversion(
                    event_type=PRELOAD_EVENT_TYPE,
                    callback=f"relay-{run}-{number}",
                    event_time_ms=at,
                    received_at_ms=at,
                    source="api",
                    event_id=f"relay-{run}-{number}",
                    params={"purchase_amount": "9.90"},
                )
                for number in range(first, min(events, first + PRELOAD_BATCH))
            ]
            store.add_conversions(batch, frozenset())
    finally:
        store.close()


def delivered_count(database_url: str) -> int:
    store = open_store(database_url)
    try:
        with store.reading() as cursor:
            cursor.execute("SELECT COUNT(*) FROM events WHERE status = 'delivered'")
            return int(cursor.fetchone()[0])
    finally:
        store.close()


def measure_relay(
    database_url: str,
    *,
    latency_ms: float,
    events: int,
    baseline_seconds: float,
    env: dict[str, str],
    log_dir: Path,
    profile_dir: Path | None,
) -> tuple[RelayFigures, str]:
    """Fill the outbox, let one relay drain it, and measure the client alone on the same mock."""
    mock = MockUpstream(log_dir, latency_ms=latency_ms).start()
    profile = ""
    try:
        run_cli(["migrate"], env, database_url=database_url)
        preload(database_url, events)
        relay = RelayProcess(
            env, database_url=database_url, upstream_url=mock.url, log_dir=log_dir
        ).start()
        try:
            first_call = _wait_for_first_call(mock, relay)
            cpu_at_first_call = cpu_seconds([relay.pid])
            recording = None
            if profile_dir is not None:
                recording = profiling.record(
                    f"relay {latency_ms:g} ms upstream",
                    relay.pid,
                    min(10.0, events / 2000),
                    profile_dir,
                    subprocesses=False,
                )
            finished = _wait_until_delivered(database_url, events, relay)
            relay_cpu = cpu_seconds([relay.pid]) - cpu_at_first_call
            if recording is not None:
                profile = recording.finish()
        finally:
            relay.terminate(check=False)
        stats = mock.stats()
        concurrency = Config.from_env(env).relay_concurrency
        baseline_rate, baseline_cpu = client_alone_rate(mock.url, concurrency, baseline_seconds)
    finally:
        mock.stop()
    figures = RelayFigures(
        latency_ms=latency_ms,
        events=events,
        seconds=finished - first_call,
        upstream_calls=int(stats["count"]),
        duplicate_callbacks=len(stats["duplicate_callbacks"]),
        cpu_ms_per_event=relay_cpu * 1000 / events,
        baseline_rate=baseline_rate,
        baseline_cpu_ms_per_call=baseline_cpu,
    )
    return figures, profile


def _wait_for_first_call(mock: MockUpstream, relay: RelayProcess) -> float:
    deadline = time.monotonic() + 60
    while mock.stats()["count"] == 0:
        if relay.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the relay sent nothing:\n{relay.log_tail()}")
        time.sleep(0.01)
    return time.monotonic()


def _wait_until_delivered(database_url: str, events: int, relay: RelayProcess) -> float:
    # Generous: even 100 deliveries a second finishes well within it.
    deadline = time.monotonic() + 60 + events / 100
    while delivered_count(database_url) < events:
        if relay.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{delivered_count(database_url)} of {events} delivered:\n{relay.log_tail()}"
            )
        time.sleep(0.05)
    return time.monotonic()


def client_alone_rate(upstream_url: str, threads: int, seconds: float) -> tuple[float, float]:
    """Calls per second ``threads`` threads make through one ``KuaishouClient``, no store, and
    the CPU milliseconds per call (this process's, which does nothing else meanwhile)."""
    client = KuaishouClient(upstream_url, timeout_seconds=10, pool_size=threads)
    stop_at = time.monotonic() + seconds
    calls = [0] * threads
    failures: list[str] = []

    def call_repeatedly(slot: int) -> None:
        number = 0
        while time.monotonic() < stop_at:
            number += 1
            at = now_ms()
            event = DueEvent(
                id=number,
                event_id=f"baseline-{slot}-{number}",
                event_type=PRELOAD_EVENT_TYPE,
                callback=f"baseline-{slot}-{number}",
                event_time_ms=at,
                params={"purchase_amount": "9.90"},
                attempts=1,
                age_base_ms=at,
            )
            answer = client.send(event)
            if answer.outcome is not Outcome.DELIVERED:
                failures.append(answer.error or answer.outcome.value)
            calls[slot] += 1

    started, cpu_before = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(call_repeatedly, range(threads)))
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_before
    client.close()
    if failures:
        raise RuntimeError(f"the baseline client failed {len(failures)} calls: {failures[0]}")
    total = sum(calls)
    return total / elapsed, cpu * 1000 / total if total else 0.0
