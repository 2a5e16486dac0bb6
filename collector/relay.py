"""The relay: claims due events from the outbox, sends them to Kuaishou, records every attempt.

Guarantee: at least once. An event is claimed under a lease before it is sent and its outcome is
committed after; a relay that dies in between leaves a lease that expires, and another relay
sends the event again. Duplicates are therefore possible only for requests in flight at a crash,
and for answers a relay could not record before their lease ran out while another relay could
reach the store (a relay cut off from the store claims nothing until it has recorded them).

No order is kept between events, not even of one click: each carries its own ``event_time``
and Kuaishou attributes it by callback, and a per-click queue would let one event stuck in
retries hold back the rest of that click's conversions.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import metrics
from .catalog import BY_CODE
from .config import Config
from .kuaishou import Answer, KuaishouClient
from .store import AttemptResult, DueEvent, Outcome, SqlStore, StoreUnavailable
from .validation import now_ms

log = logging.getLogger("ks_collector.relay")

# How often a relay writes its heartbeat (read by /readyz and `ks-collector check`).
HEARTBEAT_SECONDS = 5.0
# Pause after the store refused a claim or a record, so a down database is not hammered.
STORE_RETRY_SECONDS = 1.0


def short_callback(callback: str) -> str:
    """Enough of a click id to find it in the database, never the whole thing."""
    return callback[:8] + "…" if len(callback) > 8 else callback


def retry_delay_seconds(attempts: int, config: Config, retry_after: float | None) -> float:
    """Exponential backoff with jitter; a longer ``Retry-After`` wins, up to the cap."""
    exponential = config.retry_base_seconds * 2 ** max(0, attempts - 1)
    delay = min(config.retry_max_delay_seconds, exponential) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, config.retry_max_delay_seconds))
    return delay


class Relay:
    """One relay process's worth of delivery: a claim loop and a pool of sending threads."""

    def __init__(
        self,
        store: SqlStore,
        config: Config,
        client: KuaishouClient | None = None,
        name: str | None = None,
    ):
        self.store = store
        self.config = config
        self.concurrency = config.relay_concurrency
        self.client = client or KuaishouClient(
            config.upstream_url, config.upstream_timeout_seconds, self.concurrency
        )
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.stopping = threading.Event()
        # queue.Queue, not SimpleQueue: on Python 3.11 a signal (SIGTERM) landing near the end
        # of SimpleQueue.get(timeout) can leave it blocked for good, and the relay deaf to stop.
        self._finished: queue.Queue[AttemptResult] = queue.Queue()
        self._unrecorded: list[AttemptResult] = []
        self._in_flight = 0
        self._record_again_at = 0.0  # after a failed record, when to try the store again
        self._lease_ms = int(config.lease_seconds * 1000)
        self._max_age_ms = int(config.retry_max_age_hours * 3600 * 1000)

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Deliver until ``stop()``; then finish what is in flight, record it and return."""
        log.info(
            "relay %s sending to %s with %d in flight",
            self.name,
            self.config.upstream_url,
            self.concurrency,
        )
        next_beat = 0.0
        next_poll = 0.0
        backlog = False  # the last claim was cut short by free slots: more events are due
        refill_at = max(1, self.concurrency // 4)  # claim in batches, not one slot at a time
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="send") as pool:
            while not (self.stopping.is_set() and self._in_flight == 0):
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_SECONDS
                    self._beat()
                self._record_finished()
                free = self.concurrency - self._in_flight
                # With more events due, claim as soon as a batch of slots is free; otherwise
                # look for due events once per poll interval.
                wanted = free >= refill_at if backlog else now >= next_poll
                # Results the store has not taken yet block claiming: their leases may expire
                # meanwhile, and this relay would take those events and send them again.
                may_claim = not self.stopping.is_set() and free > 0 and not self._unrecorded
                if may_claim and wanted:
                    claimed = self._claim(pool, free)
                    backlog = claimed == free
                    pause = (
                        STORE_RETRY_SECONDS if claimed is None else self.config.relay_poll_seconds
                    )
                    next_poll = now + pause
                # Sleep until the next poll or until a request finishes, never spin: with every
                # slot busy (or when stopping) only a finished request changes anything.
                wait = self.config.relay_poll_seconds
                if may_claim and not backlog:
                    wait = max(0.0, next_poll - time.monotonic())
                self._wait_for_results(wait)
            self._record_finished()
        while self._unrecorded:
            # Stopping with results the store has not taken yet: keep trying until it does or
            # the supervisor gives up (then leases expire and those events are sent again).
            time.sleep(STORE_RETRY_SECONDS)
            self._record_finished()
        try:
            released = self.store.release_leases(self.name)
        except StoreUnavailable as error:
            log.warning(
                "relay %s could not release its leases (they will expire): %s", self.name, error
            )
            released = 0
        self.client.close()
        log.info(
            "relay %s stopped%s", self.name, f", released {released} leases" if released else ""
        )

    def stop(self) -> None:
        self.stopping.set()

    def _claim(self, pool: ThreadPoolExecutor, free: int) -> int | None:
        try:
            due = self.store.claim_due(self.name, free, now_ms(), self._lease_ms)
        except StoreUnavailable as error:
            log.warning("relay could not claim events: %s", error)
            return None
        for event in due:
            self._in_flight += 1
            pool.submit(self._send, event)
        return len(due)

    def _send(self, event: DueEvent) -> None:
        try:
            answer = self.client.send(event)
        except Exception as error:  # a bug must cost one attempt, never the relay
            log.exception("event %d: unexpected error while sending", event.id)
            answer = Answer(Outcome.TRANSIENT, 0, error=f"internal error: {error!r}"[:300])
        try:
            result = self._consequence(event, answer)
        except Exception:
            # Every claimed event must come back, or the loop would wait for it forever.
            log.exception("event %d: unexpected error while judging its answer", event.id)
            result = self._consequence(
                event, Answer(Outcome.TRANSIENT, answer.latency_ms, error="internal error")
            )
        self._finished.put(result)

    def _wait_for_results(self, timeout: float) -> None:
        try:
            result = self._finished.get(timeout=min(timeout, self.config.relay_poll_seconds))
        except queue.Empty:
            return
        self._unrecorded.append(result)
        self._in_flight -= 1

    def _record_finished(self) -> None:
        while True:
            try:
                self._unrecorded.append(self._finished.get_nowait())
                self._in_flight -= 1
            except queue.Empty:
                break
        if not self._unrecorded or time.monotonic() < self._record_again_at:
            return
        try:
            self.store.record_attempts(self.name, self._unrecorded)
        except StoreUnavailable as error:
            # Kept in memory and recorded later; if we die first, leases expire and the events
            # are sent again (at-least-once).
            log.warning("could not record %d attempts yet: %s", len(self._unrecorded), error)
            self._record_again_at = time.monotonic() + STORE_RETRY_SECONDS
            return
        except Exception:
            # One result the store refuses (a bug) must not keep the others from being recorded.
            log.exception(
                "recording %d attempts failed; recording them one by one", len(self._unrecorded)
            )
            self._record_one_by_one()
            return
        for result in self._unrecorded:
            self._log_result(result)
        self._unrecorded = []

    def _record_one_by_one(self) -> None:
        kept = []
        for result in self._unrecorded:
            try:
                self.store.record_attempts(self.name, [result])
            except StoreUnavailable:
                kept.append(result)
            except Exception:
                # Dropped: its lease expires and the event is sent again, its siblings are not
                # held back meanwhile.
                log.exception("event %d: its attempt could not be recorded", result.event.id)
            else:
                self._log_result(result)
        self._unrecorded = kept

    def _beat(self) -> None:
        try:
            self.store.beat(self.name, now_ms())
        except StoreUnavailable as error:
            log.warning("relay heartbeat failed: %s", error)

    # ---- outcomes ----------------------------------------------------------------------------

    def _consequence(self, event: DueEvent, answer: Answer) -> AttemptResult:
        at = now_ms()
        next_attempt = None
        dead = False
        if answer.outcome is Outcome.TRANSIENT:
            delay = retry_delay_seconds(event.attempts, self.config, answer.retry_after_seconds)
            next_attempt = at + int(delay * 1000)
            dead = next_attempt - event.age_base_ms > self._max_age_ms
        return AttemptResult(
            event,
            answer.outcome,
            at,
            answer.latency_ms,
            answer.http_status,
            answer.response,
            answer.error,
            next_attempt,
            dead,
        )

    def _log_result(self, result: AttemptResult) -> None:
        event = result.event
        kind = BY_CODE[event.event_type].name if event.event_type in BY_CODE else "?"
        what = f"event {event.id} ({kind}, callback {short_callback(event.callback)})"
        metrics.record_attempt(result)
        if result.outcome is Outcome.DELIVERED:
            log.info("%s delivered in %d ms", what, result.latency_ms)
        elif result.outcome is Outcome.REJECTED:
            log.warning("%s rejected by Kuaishou: %s", what, result.error)
        elif result.dead:
            log.error("%s dead after %d attempts: %s", what, event.attempts, result.error)
        else:
            wait = (result.next_attempt_at_ms or result.at_ms) - result.at_ms
            log.info(
                "%s attempt %d failed (%s); retry in %.0f s",
                what,
                event.attempts,
                result.error,
                wait / 1000,
            )
