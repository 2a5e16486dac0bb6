"""The store going away under a running relay: it keeps its answers and records them later.

For SQLite the outage is a write lock held longer than the busy timeout; for PostgreSQL the
relay's connections are cut (a TCP proxy in front of the server stops) and refused meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from collector.store import SqlStore
from tests.fault.helpers import (
    QUICK_RELAY_ENV,
    all_finished,
    delivery_figures,
    engine_of,
    form_conversions,
    queue_conversions,
    status_counts,
    wait_until,
    write_lock_held,
)
from tests.fault.tcp_proxy import TcpProxy
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess

# Longer than the store's 5 s lock timeout and than the relay's 5 s lease.
OUTAGE_SECONDS = 6.0


def test_relay_keeps_answers_through_a_store_outage_and_records_each_once(
    database_url: str, outbox: SqlStore, mock_kuaishou: MockKuaishou
) -> None:
    relay_url = database_url
    proxy = None
    if engine_of(database_url) == "postgresql":
        proxy = TcpProxy.in_front_of(database_url).start()
        relay_url = proxy.url_for(database_url)

    @contextlib.contextmanager
    def store_outage() -> Iterator[None]:
        if proxy is None:
            with write_lock_held(database_url):
                yield
        else:
            proxy.stop()
            yield
            proxy.start()

    mock_kuaishou.set_mode(latency_ms=150)  # answers arrive while the store is away
    callbacks = queue_conversions(outbox, form_conversions("outage", 300))
    relay = RelayProcess(QUICK_RELAY_ENV, database_url=relay_url, upstream_url=mock_kuaishou.url)
    relay.start()
    mock_kuaishou.wait_for_requests(40, timeout=20)
    with store_outage():
        time.sleep(OUTAGE_SECONDS)
        assert relay.poll() is None
    wait_until(lambda: all_finished(outbox, 300), 60, "every event to be delivered")
    relay.terminate()
    if proxy is not None:
        proxy.stop()

    assert "could not record" in relay.log_text()
    figures = delivery_figures(
        "store unavailable for 6 s under a running relay",
        engine_of(database_url),
        callbacks,
        mock_kuaishou,
    )
    assert (figures.delivered, figures.duplicated, figures.lost) == (300, 0, 0)
    assert status_counts(outbox) == {"delivered": 300}
