"""Fixtures shared by every test: mock Kuaishou, databases, and subprocess hygiene.

- ``mock_kuaishou``: a ``MockKuaishou`` running in this process, fresh for each test.
- ``sqlite_url``: ``sqlite:////abs/path.db`` in the test's ``tmp_path``.
- ``postgres_server``: one throwaway PostgreSQL cluster for the session (started on first use).
- ``postgres_url``: a fresh, empty database on it for each test, dropped afterwards.
- ``database_url``: runs the test twice, once on SQLite and once on PostgreSQL.
- ``browser``: one headless Chromium for the session (Playwright allows one sync driver per
  process, so every browser test shares this one).

Every ``ks-collector`` subprocess a test starts through ``tests.support.processes`` is SIGKILLed
(with its whole process group) when the test ends, pass or fail, and a failed test's report ends
with those processes' logs.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from tests.support import processes
from tests.support.browser import chromium
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.postgres import PostgresCluster, PostgresUnavailable


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI cancelling the run) unwinds like Ctrl-C, so fixture teardown still stops
    # the subprocesses and the PostgreSQL cluster instead of leaving them running.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if report.failed:
        first = getattr(item, "_ks_first_process", len(processes.STARTED_PROCESSES))
        for process in processes.STARTED_PROCESSES[first:]:
            report.sections.append(
                (f"log of {process.name} ({process.log_path})", process.log_text())
            )
    return report


@pytest.fixture(autouse=True)
def _no_orphan_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """SIGKILL the process groups of whatever the test started and did not stop."""
    request.node._ks_first_process = len(processes.STARTED_PROCESSES)
    live_before = list(processes.LIVE_PROCESSES)
    yield
    left = [p for p in processes.LIVE_PROCESSES if p not in live_before]
    processes.kill_all(left)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    processes.kill_all()


@pytest.fixture
def mock_kuaishou() -> Iterator[MockKuaishou]:
    mock = MockKuaishou()
    mock.start()
    yield mock
    mock.stop()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ks-collector.db'}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster]:
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    try:
        cluster.start()
    except PostgresUnavailable as error:
        cluster.stop()
        pytest.fail(str(error), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = postgres_server.fresh_database_name(request.node.name)
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(fixture)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched
