"""The embedded SQLite outbox: one file, WAL journal, a full fsync per commit.

Several gunicorn workers and a relay share the file. Every write transaction starts with
``BEGIN IMMEDIATE`` so it takes the write lock up front and waits for it (up to
``BUSY_TIMEOUT_MS``) instead of failing half-way with "database is locked" when two writers
meet; a writer that still cannot get it raises ``StoreUnavailable`` (the web layer answers 503).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..validation import Conversion
from .base import Accepted, SqlStore, StoreUnavailable

# How long a writer waits for another's lock before the request is answered 503.
BUSY_TIMEOUT_MS = 5000
# Pauses between two tries at the write lock while another process holds it: short at first,
# since a commit holds it for about the time of one fsync (a quarter of a millisecond on an
# SSD), then longer, for a process that holds it for long (a purge, the sqlite3 shell).
LOCK_POLL_FIRST_SECONDS = 0.00005
LOCK_POLL_MAX_SECONDS = 0.002

# AUTOINCREMENT: ids are never reused, even after purge deletes the newest rows; the API, the
# CLI and the dashboard hand ids out.
SCHEMA_FILL = {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "int64": "INTEGER"}


def path_from_url(url: str) -> str:
    """``sqlite:///relative.db`` → ``relative.db``; ``sqlite:////abs/x.db`` → ``/abs/x.db``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"not a SQLite URL: {url!r} (expected sqlite:///path/to/file.db)")
    return url[len(prefix) :]


def _begin_immediate(cursor: sqlite3.Cursor, deadline: float) -> None:
    """Take the write lock, polling with a growing pause until ``deadline``.

    The writer connection has no busy timeout: SQLite's own busy handler sleeps up to 100 ms
    between tries, so with several processes writing, the lock would sit free while waiters
    sleep. Polling from 50 microseconds up keeps it busy and throughput up; a waiter that
    wakes with jitter does not march in step with another.
    """
    pause = LOCK_POLL_FIRST_SECONDS
    while True:
        try:
            cursor.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(pause / 2, pause))
        pause = min(pause * 2, LOCK_POLL_MAX_SECONDS)


@dataclass
class _Waiting:
    """Conversions one thread handed to the group commit, and what became of them."""

    conversions: Sequence[Conversion]
    once_per_callback: frozenset[int]
    woken: threading.Event = field(default_factory=threading.Event)
    done: bool = False  # woken but not done: this thread commits the next group
    accepted: list[Accepted] = field(default_factory=list)
    error: BaseException | None = None


class SqliteStore(SqlStore):
    dialect = "sqlite"
    schema_fill = SCHEMA_FILL
    claim_sql = (
        "UPDATE events SET lease_owner = ?, lease_until_ms = ?, attempts = attempts + 1"
        " WHERE id IN (SELECT id FROM events WHERE status = 'pending'"
        " AND next_attempt_at_ms <= ? AND (lease_until_ms IS NULL OR lease_until_ms < ?)"
        " ORDER BY next_attempt_at_ms LIMIT ?)"
        " RETURNING id, event_id, event_type, callback, event_time_ms, params, attempts,"
        " COALESCE(replayed_at_ms, received_at_ms)"
    )

    def __init__(self, url: str):
        self.url = url
        self.path = path_from_url(url)
        self._local = threading.local()
        # One writer connection per process, used under _write_lock by whichever thread writes;
        # readers keep a connection per thread, so reads never queue behind a commit.
        self._writer: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._write_lock = threading.Lock()
        self._reset_group_commit()

    def _reset_group_commit(self) -> None:
        self._group_lock = threading.Lock()
        self._group: list[_Waiting] = []
        self._committing = False

    def _forget_parent_process(self) -> None:
        # Connections and locks must not cross a fork (gunicorn forks workers after the app is
        # built): a child starts with its own.
        if self._pid != os.getpid():
            self._local = threading.local()
            self._writer = None
            self._write_lock = threading.Lock()
            self._reset_group_commit()
            self._pid = os.getpid()

    def add_conversions(
        self, conversions: Sequence[Conversion], once_per_callback: frozenset[int]
    ) -> list[Accepted]:
        """Commit together with whatever this process's other threads are committing now.

        Every commit costs an fsync and only one writer may hold the file, so conversions
        arriving while a commit is under way wait; then the oldest of them writes them all in
        one transaction (group commit) and wakes the rest. Nothing is answered before it is on
        disk, and a failed commit fails every request in it.
        """
        self._forget_parent_process()
        waiting = _Waiting(conversions, once_per_callback)
        with self._group_lock:
            self._group.append(waiting)
            leading = not self._committing
            self._committing = True
        if not leading:
            waiting.woken.wait()
        if not waiting.done:
            with self._group_lock:
                group, self._group = self._group, []
            self._commit_group(group)
            with self._group_lock:
                if self._group:
                    self._group[0].woken.set()  # the oldest waiter commits the next group
                else:
                    self._committing = False
        if waiting.error is not None:
            raise waiting.error
        return waiting.accepted

    def _commit_group(self, group: list[_Waiting]) -> None:
        # Split by the once-per-click rule: callers pass the configured set, but one passing
        # another set must not have its conversions judged by the wrong rule.
        by_rule: dict[frozenset[int], list[_Waiting]] = {}
        for waiting in group:
            by_rule.setdefault(waiting.once_per_callback, []).append(waiting)
        for once_per_callback, members in by_rule.items():
            conversions = [c for member in members for c in member.conversions]
            try:
                accepted = SqlStore.add_conversions(self, conversions, once_per_callback)
            except BaseException as error:
                accepted = []
                for member in members:
                    member.error = error
            for member in members:
                count = len(member.conversions)
                member.accepted, accepted = accepted[:count], accepted[count:]
                member.done = True
                member.woken.set()

    def _connection(self) -> sqlite3.Connection:
        """This thread's reading connection."""
        self._forget_parent_process()
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._open()
            self._local.connection = connection
        return connection

    def _open(self, *, any_thread: bool = False) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=not any_thread,
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk before we answer 2xx, power loss included.
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        self._forget_parent_process()
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        # Threads of one process queue on a Python lock, which wakes the next one at once;
        # only one of them at a time polls SQLite's lock against the other processes.
        if not self._write_lock.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            raise StoreUnavailable(
                f"SQLite write lock not free within {BUSY_TIMEOUT_MS} ms (this process's writers)"
            )
        try:
            try:
                if self._writer is None:
                    writer = self._open(any_thread=True)
                    # _begin_immediate does the waiting for the lock, with its own pauses.
                    writer.execute("PRAGMA busy_timeout = 0")
                    self._writer = writer
                connection = self._writer
                cursor = connection.cursor()
                _begin_immediate(cursor, deadline)
            except sqlite3.Error as error:
                raise StoreUnavailable(f"SQLite could not start a transaction: {error}") from error
            try:
                yield cursor
                cursor.execute("COMMIT")
            except sqlite3.OperationalError as error:
                # Locked, disk full, I/O error, read-only file: nothing of it was committed.
                self._rollback(connection)
                if "readonly" in str(error):
                    # SQLite opened the file read-only and keeps it so: the next transaction
                    # opens it afresh, and writes again once the file is writable.
                    connection.close()
                    self._writer = None
                raise StoreUnavailable(f"SQLite could not commit: {error}") from error
            except BaseException:
                self._rollback(connection)
                raise
        finally:
            self._write_lock.release()

    @staticmethod
    def _rollback(connection: sqlite3.Connection) -> None:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Cursor]:
        try:
            cursor = self._connection().cursor()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"SQLite could not be opened: {error}") from error
        try:
            yield cursor
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"SQLite read failed: {error}") from error
        finally:
            cursor.close()

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
