"""The durable outbox. ``open_store(url)`` picks the engine from the URL's scheme."""

from __future__ import annotations

from .base import (
    Accepted,
    AttemptResult,
    DueEvent,
    Outcome,
    SqlStore,
    Status,
    StoreUnavailable,
)

# Ids and millisecond times are 64-bit integers in both engines; larger numbers match nothing.
MAX_INT64 = 2**63 - 1


def open_store(url: str) -> SqlStore:
    """``sqlite:///file.db`` or ``postgresql://…``; the returned store opens connections lazily."""
    if url.startswith("sqlite:"):
        from .sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///… or postgresql://…")


__all__ = [
    "MAX_INT64",
    "Accepted",
    "AttemptResult",
    "DueEvent",
    "Outcome",
    "SqlStore",
    "Status",
    "StoreUnavailable",
    "open_store",
]
