"""The PostgreSQL outbox, for several collectors and relays sharing one database.

psycopg 3 with its connection pool: plain SQL is all the outbox needs, and SQLAlchemy would
add a layer between us and the two statements that matter (the claim's ``FOR UPDATE SKIP
LOCKED`` and ``ON CONFLICT DO NOTHING``) without removing any code.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .base import SqlStore, StoreUnavailable

SCHEMA_FILL = {"pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "int64": "BIGINT"}
# Any constant works; it only has to be the same for every process migrating this database.
_MIGRATION_LOCK = 0x6B5F636F6C6C
# How long a statement waits for a row or table lock before the request is answered 503; the
# same bound as SQLite's busy timeout, so both engines fail the same way when locked too long.
LOCK_TIMEOUT_MS = 5000


def _key_hash(key: str) -> int:
    """A unique key as a signed 64-bit advisory-lock id."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresStore(SqlStore):
    dialect = "postgresql"
    schema_fill = SCHEMA_FILL
    claim_sql = (
        "UPDATE events SET lease_owner = %s, lease_until_ms = %s, attempts = attempts + 1"
        " WHERE id IN (SELECT id FROM events WHERE status = 'pending'"
        " AND next_attempt_at_ms <= %s AND (lease_until_ms IS NULL OR lease_until_ms < %s)"
        " ORDER BY next_attempt_at_ms LIMIT %s FOR UPDATE SKIP LOCKED)"
        " RETURNING id, event_id, event_type, callback, event_time_ms, params, attempts,"
        " COALESCE(replayed_at_ms, received_at_ms)"
    )

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 5.0):
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "PostgreSQL needs psycopg: pip install 'ks-collector[postgres]'"
            ) from error
        self.url = url
        self._pool_args = {"min_size": min_size, "max_size": max_size, "timeout": timeout}
        self._pool: Any = None
        self._pid = os.getpid()
        # The threads of a fresh gunicorn worker may all ask for the pool at once.
        self._pool_lock = threading.Lock()

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _get_pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        # A pool's sockets must not be shared across a fork: each process opens its own.
        with self._pool_lock:
            if self._pool is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._pool = ConnectionPool(
                    self.url,
                    open=True,
                    **self._pool_args,
                    kwargs={"autocommit": False},
                    configure=_configure_connection,
                    # After a database restart pooled connections are dead; test each one as it
                    # is handed out instead of failing requests with 503 until they are used up.
                    check=ConnectionPool.check_connection,
                )
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._get_pool().connection() as connection:
                yield connection
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as error:
            # Server down or restarting, connection lost, lock or statement timeout, disk full:
            # the transaction did not commit.
            raise StoreUnavailable(f"PostgreSQL unavailable: {error}") from error

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self._connection() as connection, connection.cursor() as cursor:
            yield cursor
            # The pool commits on a clean exit from connection() and rolls back on error.

    @contextmanager
    def reading(self) -> Iterator[Any]:
        with self._connection() as connection, connection.cursor() as cursor:
            yield cursor

    def _lock_unique_keys(self, cursor: Any, keys: list[str]) -> None:
        # Two batches sharing keys in opposite orders would each hold an index entry the other
        # waits for: a deadlock. Advisory locks taken in sorted order serialize them instead,
        # while rows still go in (and get ids) in the caller's order.
        hashes = sorted({_key_hash(key) for key in keys})
        cursor.execute(
            "SELECT count(pg_advisory_xact_lock(k))"
            " FROM (SELECT unnest(%s::bigint[]) AS k ORDER BY k) AS sorted_keys",
            (hashes,),
        )

    def _before_migrating(self, cursor: Any) -> None:
        # A migration may wait for relays' and workers' locks; it must not give up after
        # LOCK_TIMEOUT_MS like a request does. The advisory lock makes concurrent migrations
        # (several machines starting at once) take turns.
        cursor.execute("SET LOCAL lock_timeout = '60s'")
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None


def _configure_connection(connection: Any) -> None:
    """Settings of every pooled connection, before its first use."""
    connection.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    connection.commit()
