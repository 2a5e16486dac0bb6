"""The throwaway PostgreSQL server the store tests run against."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.postgres import PostgresCluster


def test_a_table_round_trips_a_row(postgres_url):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE outbox_probe (id serial PRIMARY KEY, callback text NOT NULL)")
        conn.execute("INSERT INTO outbox_probe (callback) VALUES (%s)", ("CLICK-1",))
        conn.commit()

    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT id, callback FROM outbox_probe").fetchall()

    assert rows == [(1, "CLICK-1")]


@pytest.mark.parametrize("attempt", [1, 2])
def test_each_test_gets_an_empty_database(postgres_url, attempt):
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        conn.execute("CREATE TABLE left_behind (n int)")

    assert tables == (0,)


def test_server_is_durable_and_local_only(postgres_server: PostgresCluster, postgres_url):
    with psycopg.connect(postgres_url) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'listen_addresses')"
            ).fetchall()
        )

    assert settings == {"fsync": "on", "synchronous_commit": "on", "listen_addresses": "127.0.0.1"}
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")


def test_dropping_a_database_disconnects_its_clients(postgres_server: PostgresCluster):
    name = postgres_server.fresh_database_name("drop me")
    url = postgres_server.create_database(name)

    with psycopg.connect(url) as lingering:
        postgres_server.drop_database(name)

        with pytest.raises(psycopg.OperationalError):
            lingering.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
