"""Prometheus metrics shared by the web workers and the relay.

Under gunicorn every worker is a process of its own, so prometheus_client runs in multiprocess
mode: ``ks-collector serve`` (or ``ks-collector web`` run alone) points
``PROMETHEUS_MULTIPROC_DIR`` at a directory it empties at start, before any process imports this
module; every worker and the relay write their counters there and ``/metrics`` merges them.
Outbox gauges are not counted by processes at all: they are read from the store at scrape time,
so every web machine reports the same, whole-outbox values.

A relay started alone (``ks-collector relay`` on a machine of its own) has no web server to
export its counters; its work still shows in the outbox gauges of any web machine's /metrics.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .store import AttemptResult, SqlStore

EVENTS_RECEIVED = Counter(
    "ks_events_received", "Events accepted into the outbox.", ["source", "event_type"]
)
EVENTS_DUPLICATE = Counter(
    "ks_events_duplicate",
    "Events answered duplicate (event id or once-per-click).",
    ["source", "event_type"],
)
EVENTS_REFUSED = Counter(
    "ks_events_refused", "Requests refused before reaching the outbox.", ["source", "reason"]
)
RELAY_ATTEMPTS = Counter(
    "ks_relay_attempts",
    "Calls to Kuaishou by outcome: delivered, rejected, transient (retried later) or dead.",
    ["event_type", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "ks_upstream_latency_seconds",
    "Duration of one call to Kuaishou.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DELIVERY_LATENCY = Histogram(
    "ks_delivery_latency_seconds",
    "From arrival at the collector to Kuaishou's result 1.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
)


def record_attempt(result: AttemptResult) -> None:
    """Count one finished call to Kuaishou.

    The ``event_type`` label is the event's code, as on ``ks_events_received``, so the two can
    be joined in a query.
    """
    outcome = "dead" if result.dead else result.outcome.value
    RELAY_ATTEMPTS.labels(str(result.event.event_type), outcome).inc()
    UPSTREAM_LATENCY.observe(result.latency_ms / 1000)
    if outcome == "delivered":
        DELIVERY_LATENCY.observe(max(0, result.at_ms - result.event.age_base_ms) / 1000)


class OutboxCollector:
    """Reads outbox gauges from the store when Prometheus scrapes."""

    def __init__(self, store: SqlStore):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        from .store import StoreUnavailable
        from .validation import now_ms

        try:
            now = now_ms()
            pending, oldest_ms = self.store.pending_summary(now)
            dead = self.store.count_status("dead")
            beat = self.store.latest_heartbeat_ms()
        except StoreUnavailable:
            # The outbox gauges are left out rather than reported as zeros that look healthy.
            yield GaugeMetricFamily("ks_store_up", "1 if the store answered this scrape.", 0)
            return
        yield GaugeMetricFamily("ks_store_up", "1 if the store answered this scrape.", 1)
        yield GaugeMetricFamily("ks_outbox_pending", "Events not yet delivered.", pending)
        yield GaugeMetricFamily(
            "ks_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event.",
            (oldest_ms or 0) / 1000,
        )
        yield GaugeMetricFamily("ks_outbox_dead", "Events that ran out of retries.", dead)
        yield GaugeMetricFamily(
            "ks_relay_heartbeat_age_seconds",
            "Seconds since any relay last reported in.",
            (now - beat) / 1000 if beat else float("nan"),
        )


def render(store: SqlStore) -> bytes:
    """The /metrics body: every process's counters plus the outbox gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    output = generate_latest(registry)
    outbox = CollectorRegistry()
    outbox.register(OutboxCollector(store))
    return output + generate_latest(outbox)
