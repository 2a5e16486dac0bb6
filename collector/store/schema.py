"""Versioned schema migrations, written once for both engines.

Each migration is a list of statements with ``{pk}`` (an auto-numbered key) and ``{int64}``
placeholders that each engine fills in. Append new migrations; never edit an applied one.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "outbox, attempts, landings, leads, relay heartbeats",
        [
            """CREATE TABLE events (
            id {pk},
            event_id TEXT NOT NULL UNIQUE,
            once_key TEXT UNIQUE,
            source TEXT NOT NULL,
            event_type INTEGER NOT NULL,
            callback TEXT NOT NULL,
            event_time_ms {int64} NOT NULL,
            params TEXT NOT NULL,
            lead_id TEXT,
            received_at_ms {int64} NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at_ms {int64} NOT NULL,
            lease_owner TEXT,
            lease_until_ms {int64},
            replayed_at_ms {int64},
            last_http_status INTEGER,
            last_response TEXT,
            last_error TEXT,
            finished_at_ms {int64}
        )""",
            "CREATE INDEX events_due ON events (next_attempt_at_ms) WHERE status = 'pending'",
            "CREATE INDEX events_received ON events (received_at_ms)",
            "CREATE INDEX events_status_finished ON events (status, finished_at_ms)",
            """CREATE TABLE attempts (
            id {pk},
            event_pk {int64} NOT NULL REFERENCES events (id),
            at_ms {int64} NOT NULL,
            relay TEXT NOT NULL,
            outcome TEXT NOT NULL,
            http_status INTEGER,
            latency_ms INTEGER NOT NULL,
            response TEXT,
            error TEXT
        )""",
            "CREATE INDEX attempts_event ON attempts (event_pk)",
            """CREATE TABLE landings (
            callback_key TEXT PRIMARY KEY,
            first_seen_ms {int64} NOT NULL
        )""",
            """CREATE TABLE leads (
            lead_id TEXT PRIMARY KEY,
            callback TEXT NOT NULL,
            created_at_ms {int64} NOT NULL
        )""",
            """CREATE TABLE relay_heartbeats (
            relay TEXT PRIMARY KEY,
            beat_at_ms {int64} NOT NULL
        )""",
        ],
    ),
]

LATEST_VERSION = MIGRATIONS[-1][0]
