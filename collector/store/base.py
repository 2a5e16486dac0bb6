"""The outbox: what every store does, whatever engine keeps the rows.

``SqlStore`` holds the logic and the SQL both engines share; ``SqliteStore`` and
``PostgresStore`` add connections, transactions and the few statements that differ. Callers
only see the methods of ``SqlStore`` and the records below.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..validation import Conversion
from .schema import MIGRATIONS

# How much of an upstream answer is kept per attempt: enough to read an error message.
RESPONSE_EXCERPT_CHARS = 500
# Events deleted per transaction by a purge, so that intake is never locked out for long.
PURGE_BATCH = 1000


class Status(StrEnum):
    """Where an event is in its life; only ``pending`` events are ever sent."""

    PENDING = "pending"
    DELIVERED = "delivered"
    REJECTED = "rejected"
    DEAD = "dead"


class Outcome(StrEnum):
    """What one delivery attempt came to."""

    DELIVERED = "delivered"
    REJECTED = "rejected"
    TRANSIENT = "transient"


class StoreUnavailable(RuntimeError):
    """The store could not commit in time (locked, disk full, database down). Try later."""


@dataclass(frozen=True)
class Accepted:
    """What became of one conversion handed to ``add_conversions``."""

    status: str  # "accepted" or "duplicate"
    id: int
    event_id: str


@dataclass(frozen=True)
class DueEvent:
    """A claimed event: everything the relay needs to send it."""

    id: int
    event_id: str
    event_type: int
    callback: str
    event_time_ms: int
    params: dict[str, str]
    attempts: int
    age_base_ms: int


@dataclass(frozen=True)
class AttemptResult:
    """One finished attempt, to be recorded with its consequence for the event."""

    event: DueEvent
    outcome: Outcome
    at_ms: int
    latency_ms: int
    http_status: int | None
    response: str | None
    error: str | None
    next_attempt_at_ms: int | None = None  # for transient outcomes still worth retrying
    dead: bool = False  # transient, but the event is past its retry age


def callback_key(callback: str) -> str:
    """A fixed-size key for a click id: callbacks can be kilobytes, index entries should not."""
    return hashlib.sha256(callback.encode("utf-8", "surrogatepass")).hexdigest()


def once_key(event_type: int, callback: str) -> str:
    return f"{event_type}:{callback_key(callback)}"


def storable_text(text: str | None, limit: int) -> str | None:
    """An upstream answer or error cut to ``limit`` characters and without NUL characters.

    PostgreSQL refuses NUL in text; one garbled answer must not stop its attempt (and the rest
    of the batch) from being recorded.
    """
    if not text:
        return None
    return text[:limit].replace("\x00", "\N{REPLACEMENT CHARACTER}")


def like_pattern(fragment: str) -> str:
    """A case-insensitive ``LIKE ... ESCAPE '\\'`` pattern matching ``fragment`` literally."""
    escaped = fragment.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


EVENT_COLUMNS = (
    "id, event_id, source, event_type, callback, event_time_ms, params, lead_id, "
    "received_at_ms, status, attempts, next_attempt_at_ms, lease_owner, lease_until_ms, "
    "last_http_status, last_response, last_error, finished_at_ms"
)
_CLAIMED_COLUMNS = (
    "id, event_id, event_type, callback, event_time_ms, params, attempts, "
    "COALESCE(replayed_at_ms, received_at_ms)"
)


class SqlStore(ABC):
    """Outbox operations in SQL common to SQLite and PostgreSQL (``?`` placeholders)."""

    dialect = ""
    # How this engine spells the schema's placeholders (collector/store/schema.py).
    schema_fill: dict[str, str] = {}  # noqa: RUF012 (a per-engine constant, never mutated)
    # Statement that claims due events; engines differ in how they skip rows others hold.
    claim_sql = ""

    # ---- engine hooks ------------------------------------------------------------------------

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction yielding a cursor; commits on exit, rolls back on error."""

    @abstractmethod
    def reading(self) -> AbstractContextManager[Any]:
        """A cursor for reads."""

    def migrate(self) -> list[int]:
        """Apply pending schema migrations in one transaction; return the versions applied."""
        applied: list[int] = []
        with self.transaction() as cursor:
            self._before_migrating(cursor)
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at_ms {int64} NOT NULL)".format(
                    **self.schema_fill
                )
            )
            cursor.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cursor.fetchall()}
            for version, _description, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    cursor.execute(statement.format(**self.schema_fill))
                cursor.execute(
                    self.sql(
                        "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?, ?)"
                    ),
                    (version, time.time_ns() // 1_000_000),
                )
                applied.append(version)
        return applied

    def _before_migrating(self, cursor: Any) -> None:
        """Engine-specific preparation inside the migration's transaction (none by default)."""
        return

    @abstractmethod
    def close(self) -> None:
        """Close this process's connections."""

    def sql(self, text: str) -> str:
        return text

    # ---- intake ------------------------------------------------------------------------------

    def add_conversions(
        self, conversions: Sequence[Conversion], once_per_callback: frozenset[int]
    ) -> list[Accepted]:
        """Commit conversions in one transaction; known ``event_id`` s and repeats of a
        once-per-click event come back as duplicates instead of being stored twice."""
        insert = self.sql(
            "INSERT INTO events (event_id, once_key, source, event_type, callback, event_time_ms,"
            " params, lead_id, received_at_ms, next_attempt_at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id"
        )
        keys = [
            once_key(c.event_type, c.callback) if c.event_type in once_per_callback else None
            for c in conversions
        ]
        results: list[Accepted] = []
        with self.transaction() as cursor:
            self._lock_unique_keys(
                cursor, [key for key in keys if key] + [c.event_id for c in conversions]
            )
            for conversion, key in zip(conversions, keys, strict=True):
                assert conversion.callback is not None, "lead ids are resolved before storing"
                cursor.execute(
                    insert,
                    (
                        conversion.event_id,
                        key,
                        conversion.source,
                        conversion.event_type,
                        conversion.callback,
                        conversion.event_time_ms,
                        json.dumps(conversion.params, separators=(",", ":")),
                        conversion.lead_id,
                        conversion.received_at_ms,
                        conversion.received_at_ms,
                    ),
                )
                row = cursor.fetchone()
                if conversion.lead_id and conversion.source == "tag":
                    # Linked even for a repeated form: a second lead from one click is real.
                    self._link_lead(cursor, conversion)
                if row is not None:
                    results.append(Accepted("accepted", row[0], conversion.event_id))
                    continue
                cursor.execute(
                    self.sql(
                        "SELECT id, event_id FROM events WHERE event_id = ? OR once_key = ? LIMIT 1"
                    ),
                    (conversion.event_id, key),
                )
                existing = cursor.fetchone()
                results.append(Accepted("duplicate", existing[0], existing[1]))
        return results

    def _lock_unique_keys(self, cursor: Any, keys: list[str]) -> None:
        """Before a batch's inserts, lock its unique keys in one global order, where the engine
        lets concurrent writers interleave (PostgreSQL). SQLite has one writer at a time."""
        return

    def record_landing(self, callback: str, at_ms: int) -> bool:
        """Remember that the tag captured this click id; True the first time."""
        with self.transaction() as cursor:
            cursor.execute(
                self.sql(
                    "INSERT INTO landings (callback_key, first_seen_ms) VALUES (?, ?)"
                    " ON CONFLICT DO NOTHING RETURNING first_seen_ms"
                ),
                (callback_key(callback), at_ms),
            )
            return cursor.fetchone() is not None

    def has_landing(self, callback: str) -> bool:
        with self.reading() as cursor:
            cursor.execute(
                self.sql("SELECT 1 FROM landings WHERE callback_key = ?"), (callback_key(callback),)
            )
            return cursor.fetchone() is not None

    def _link_lead(self, cursor: Any, conversion: Conversion) -> None:
        """Link the advertiser's lead id to the click it came from. The first link stands:
        /collect is public, and a later beacon naming the same lead id must not move a real
        visitor's lead (and the payments reported for it) to another click."""
        cursor.execute(
            self.sql(
                "INSERT INTO leads (lead_id, callback, created_at_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (lead_id) DO NOTHING"
            ),
            (conversion.lead_id, conversion.callback, conversion.received_at_ms),
        )

    def resolve_leads(self, lead_ids: Iterable[str]) -> dict[str, str]:
        wanted = sorted(set(lead_ids))
        found: dict[str, str] = {}
        with self.reading() as cursor:
            for lead_id in wanted:
                cursor.execute(self.sql("SELECT callback FROM leads WHERE lead_id = ?"), (lead_id,))
                row = cursor.fetchone()
                if row is not None:
                    found[lead_id] = row[0]
        return found

    # ---- relay -------------------------------------------------------------------------------

    def claim_due(self, owner: str, limit: int, now_ms: int, lease_ms: int) -> list[DueEvent]:
        """Lease up to ``limit`` due events to ``owner``; expired leases count as free.

        Times are the calling relay's clock. Relays on several machines must keep their clocks
        within a small part of the lease of each other (NTP): one running ahead would take
        leases still held by another and send those events a second time.
        """
        with self.transaction() as cursor:
            cursor.execute(self.claim_sql, (owner, now_ms + lease_ms, now_ms, now_ms, limit))
            rows = cursor.fetchall()
        return [
            DueEvent(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7])
            for row in rows
        ]

    def record_attempts(self, owner: str, results: Sequence[AttemptResult]) -> None:
        """Store finished attempts and move each event on, in one transaction."""
        if not results:
            return
        with self.transaction() as cursor:
            for result in results:
                self._record_attempt(cursor, owner, result)

    def _record_attempt(self, cursor: Any, owner: str, result: AttemptResult) -> None:
        response = storable_text(result.response, RESPONSE_EXCERPT_CHARS)
        error = storable_text(result.error, RESPONSE_EXCERPT_CHARS)
        cursor.execute(
            self.sql(
                "INSERT INTO attempts (event_pk, at_ms, relay, outcome, http_status, latency_ms,"
                " response, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            (
                result.event.id,
                result.at_ms,
                owner,
                result.outcome.value,
                result.http_status,
                result.latency_ms,
                response,
                error,
            ),
        )
        last = (result.http_status, response, error)
        if result.outcome is Outcome.TRANSIENT and not result.dead:
            # Only the lease holder reschedules: another relay may have taken an expired lease.
            cursor.execute(
                self.sql(
                    "UPDATE events SET next_attempt_at_ms = ?, lease_owner = NULL,"
                    " lease_until_ms = NULL, last_http_status = ?, last_response = ?,"
                    " last_error = ? WHERE id = ? AND status = 'pending' AND lease_owner = ?"
                ),
                (result.next_attempt_at_ms, *last, result.event.id, owner),
            )
            return
        status = {Outcome.DELIVERED: Status.DELIVERED, Outcome.REJECTED: Status.REJECTED}.get(
            result.outcome, Status.DEAD
        )
        # A final answer is a fact whoever holds the lease, so it is recorded regardless.
        cursor.execute(
            self.sql(
                "UPDATE events SET status = ?, finished_at_ms = ?, lease_owner = NULL,"
                " lease_until_ms = NULL, last_http_status = ?, last_response = ?, last_error = ?"
                " WHERE id = ? AND status = 'pending'"
            ),
            (status.value, result.at_ms, *last, result.event.id),
        )

    def release_leases(self, owner: str) -> int:
        """Give back leases ``owner`` still holds (on a clean stop, nothing should be left)."""
        with self.transaction() as cursor:
            cursor.execute(
                self.sql(
                    "UPDATE events SET lease_owner = NULL, lease_until_ms = NULL"
                    " WHERE lease_owner = ? AND status = 'pending'"
                ),
                (owner,),
            )
            return cursor.rowcount

    def beat(self, relay: str, at_ms: int) -> None:
        with self.transaction() as cursor:
            cursor.execute(
                self.sql(
                    "INSERT INTO relay_heartbeats (relay, beat_at_ms) VALUES (?, ?)"
                    " ON CONFLICT (relay) DO UPDATE SET beat_at_ms = excluded.beat_at_ms"
                ),
                (relay, at_ms),
            )

    def latest_heartbeat_ms(self) -> int | None:
        with self.reading() as cursor:
            cursor.execute("SELECT MAX(beat_at_ms) FROM relay_heartbeats")
            row = cursor.fetchone()
        return row[0] if row else None

    # ---- operations --------------------------------------------------------------------------

    def requeue(
        self,
        now_ms: int,
        *,
        ids: Sequence[int] = (),
        statuses: Sequence[str] = (Status.DEAD, Status.REJECTED),
        since_ms: int | None = None,
        until_ms: int | None = None,
        error_contains: str | None = None,
    ) -> int:
        """Send dead or rejected events again; returns how many were re-queued.

        Filters combine (all must match): event ids, received time range, and text the last
        answer or error contains (case-insensitive). The event's ``attempts`` restarts at 0 so
        the backoff schedule and the retry age start over; every earlier try stays in the
        attempts table.
        """
        allowed = [
            Status(status).value for status in statuses if status in (Status.DEAD, Status.REJECTED)
        ]
        if not allowed:
            return 0
        clauses = [f"status IN ({', '.join('?' for _ in allowed)})"]
        args: list[Any] = list(allowed)
        if ids:
            clauses.append(f"id IN ({', '.join('?' for _ in ids)})")
            args.extend(ids)
        if since_ms is not None:
            clauses.append("received_at_ms >= ?")
            args.append(since_ms)
        if until_ms is not None:
            clauses.append("received_at_ms < ?")
            args.append(until_ms)
        if error_contains:
            clauses.append(
                "LOWER(COALESCE(last_response, '') || ' ' || COALESCE(last_error, ''))"
                " LIKE ? ESCAPE '\\'"
            )
            args.append(like_pattern(error_contains))
        with self.transaction() as cursor:
            cursor.execute(
                self.sql(
                    "UPDATE events SET status = 'pending', next_attempt_at_ms = ?, attempts = 0,"
                    " replayed_at_ms = ?, finished_at_ms = NULL, lease_owner = NULL,"
                    " lease_until_ms = NULL WHERE " + " AND ".join(clauses)
                ),
                (now_ms, now_ms, *args),
            )
            return cursor.rowcount

    def purge_delivered(self, older_than_ms: int, batch_size: int = PURGE_BATCH) -> int:
        """Delete delivered events (and their attempts) finished before ``older_than_ms``.

        In transactions of ``batch_size`` events: one transaction over months of events would
        hold SQLite's write lock long enough for intake to answer 503 meanwhile.
        """
        purged = 0
        while True:
            with self.transaction() as cursor:
                cursor.execute(
                    self.sql(
                        "SELECT id FROM events WHERE status = 'delivered' AND finished_at_ms < ?"
                        " ORDER BY id LIMIT ?"
                    ),
                    (older_than_ms, batch_size),
                )
                ids = [row[0] for row in cursor.fetchall()]
                if not ids:
                    return purged
                marks = ", ".join("?" for _ in ids)
                cursor.execute(self.sql(f"DELETE FROM attempts WHERE event_pk IN ({marks})"), ids)
                cursor.execute(self.sql(f"DELETE FROM events WHERE id IN ({marks})"), ids)
                purged += len(ids)

    def list_events(
        self,
        *,
        status: str | None = None,
        event_type: int | None = None,
        reason: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Most recent events first, as dictionaries, for the CLI and the dashboard. ``reason``
        keeps only events whose last error is exactly it (``""`` for none), so a row of
        ``rejection_reasons`` leads to its events."""
        clauses, args = ["1 = 1"], []
        for clause, value in (
            ("status = ?", status),
            ("event_type = ?", event_type),
            ("COALESCE(last_error, '') = ?", reason),
            ("id < ?", before_id),
        ):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        with self.reading() as cursor:
            cursor.execute(
                self.sql(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(clauses)}"
                    " ORDER BY id DESC LIMIT ?"
                ),
                (*args, limit),
            )
            names = [column.strip() for column in EVENT_COLUMNS.split(",")]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        for row in rows:
            row["params"] = json.loads(row["params"])
        return rows

    def attempts_of(self, event_pk: int) -> list[dict[str, Any]]:
        names = ["at_ms", "relay", "outcome", "http_status", "latency_ms", "response", "error"]
        with self.reading() as cursor:
            cursor.execute(
                self.sql(f"SELECT {', '.join(names)} FROM attempts WHERE event_pk = ? ORDER BY id"),
                (event_pk,),
            )
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def count_by_type_and_status(self, since_ms: int) -> list[tuple[int, str, int]]:
        with self.reading() as cursor:
            cursor.execute(
                self.sql(
                    "SELECT event_type, status, COUNT(*) FROM events WHERE received_at_ms >= ?"
                    " GROUP BY event_type, status ORDER BY event_type, status"
                ),
                (since_ms,),
            )
            return [tuple(row) for row in cursor.fetchall()]

    def count_status(self, status: str) -> int:
        with self.reading() as cursor:
            cursor.execute(self.sql("SELECT COUNT(*) FROM events WHERE status = ?"), (status,))
            return cursor.fetchone()[0]

    def pending_summary(self, now_ms: int) -> tuple[int, int | None]:
        """(pending events, age in ms of the oldest one) for metrics and readiness."""
        with self.reading() as cursor:
            cursor.execute(
                "SELECT COUNT(*), MIN(received_at_ms) FROM events WHERE status = 'pending'"
            )
            count, oldest = cursor.fetchone()
        return count, (now_ms - oldest if oldest is not None else None)

    def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless a write commits now. A row is rewritten with its own
        value: a transaction that writes nothing commits on a read-only file or database (wrong
        ownership, a replica) where every beacon would be refused."""
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE schema_migrations SET applied_at_ms = applied_at_ms"
                " WHERE version = (SELECT MAX(version) FROM schema_migrations)"
            )

    # ---- dashboard queries -------------------------------------------------------------------
    # Read-only summaries for /admin, `ks-collector stats` and `ks-collector check`.

    def daily_counts(
        self, since_ms: int, utc_offset_ms: int = 0
    ) -> list[tuple[int, int, str, int]]:
        """``(day, event_type, status, count)`` of events received since ``since_ms``.

        ``day`` counts days since 1970-01-01 in a zone ``utc_offset_ms`` east of UTC, so the
        dashboard's days start at local midnight.
        """
        with self.reading() as cursor:
            cursor.execute(
                self.sql(
                    "SELECT (received_at_ms + ?) / 86400000, event_type, status, COUNT(*)"
                    " FROM events WHERE received_at_ms >= ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
                ),
                (utc_offset_ms, since_ms),
            )
            return [(int(row[0]), row[1], row[2], row[3]) for row in cursor.fetchall()]

    def rejection_reasons(self, since_ms: int, limit: int = 10) -> list[tuple[str, str, int]]:
        """``(status, last error, count)`` of rejected and dead events, commonest first."""
        with self.reading() as cursor:
            cursor.execute(
                self.sql(
                    "SELECT status, COALESCE(last_error, ''), COUNT(*) FROM events"
                    " WHERE status IN ('rejected', 'dead') AND received_at_ms >= ?"
                    " GROUP BY 1, 2 ORDER BY 3 DESC, 2, 1 LIMIT ?"
                ),
                (since_ms, limit),
            )
            return [tuple(row) for row in cursor.fetchall()]

    def relay_heartbeats(self) -> list[tuple[str, int]]:
        """``(relay name, last beat ms)`` of every relay that ever reported in, latest first."""
        with self.reading() as cursor:
            cursor.execute("SELECT relay, beat_at_ms FROM relay_heartbeats ORDER BY 2 DESC, 1")
            return [tuple(row) for row in cursor.fetchall()]

    def schema_version(self) -> int | None:
        """The newest applied migration, or None for a store that was never migrated."""
        if self.dialect == "sqlite":
            exists = "SELECT COUNT(*) FROM sqlite_master WHERE name = 'schema_migrations'"
        else:
            exists = (
                "SELECT COUNT(*) FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
            )
        with self.reading() as cursor:
            cursor.execute(exists)
            if not cursor.fetchone()[0]:
                return None
            cursor.execute("SELECT MAX(version) FROM schema_migrations")
            return cursor.fetchone()[0]
