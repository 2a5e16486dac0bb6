"""Fixtures of the fault scenarios (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from collector.store import SqlStore
from tests.fault.helpers import migrated_store


@pytest.fixture
def outbox(database_url: str) -> Iterator[SqlStore]:
    """The test's store, migrated, opened in this process to fill it and read it back."""
    store = migrated_store(database_url)
    yield store
    store.close()
