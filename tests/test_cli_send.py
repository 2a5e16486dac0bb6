"""``ks-collector send`` and ``ks-collector events``: the API's validation and outbox, from a shell.

Each test runs the real command as a subprocess against a real SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest

from collector.store import open_store
from collector.validation import Conversion, now_ms
from tests.support.processes import RelayProcess, run_cli


@pytest.fixture
def database(sqlite_url) -> str:
    run_cli(["migrate"], database_url=sqlite_url)
    return sqlite_url


def send(database: str, *args: str, check: bool = True):
    return run_cli(["send", *args], database_url=database, check=check)


def stored(database: str) -> list[dict]:
    store = open_store(database)
    try:
        return list(reversed(store.list_events(limit=1000)))
    finally:
        store.close()


def test_send_queues_a_payment_with_its_amount_in_two_decimals(database):
    result = send(database, "payment", "--callback", "CLICK-1", "--amount", "9.9")

    [row] = stored(database)
    assert result.stdout == f"accepted: event {row['id']} ({row['event_id']})\n"
    assert (row["event_type"], row["callback"], row["params"], row["source"]) == (
        3,
        "CLICK-1",
        {"purchase_amount": "9.90"},
        "cli",
    )


def test_send_takes_other_parameters_as_name_value_pairs(database):
    send(database, "120", "--callback", "CLICK-1", "--param", "action_reason=4")
    assert stored(database)[0]["params"] == {"action_reason": "4"}


def test_send_keeps_the_event_id_and_event_time(database):
    event_time = now_ms() - 60_000
    send(
        database,
        "form",
        "--callback",
        "CLICK-1",
        "--event-id",
        "support-1",
        "--event-time",
        str(event_time),
    )
    [row] = stored(database)
    assert (row["event_id"], row["event_time_ms"]) == ("support-1", event_time)


def test_send_refuses_what_the_api_refuses_naming_each_field(database):
    result = send(
        database, "payment", "--callback", "__CALLBACK__", "--param", "action_reason=4", check=False
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "callback: is the unreplaced macro __CALLBACK__: the landing URL was not filled in by "
        "Kuaishou\n"
        "purchase_amount: is required for event_type 3 (payment)\n"
        "action_reason: is not accepted with event_type 3 (payment)\n"
        "Error: event refused\n"
    )
    assert stored(database) == []


@pytest.mark.parametrize("pair", ["colour=red", "callback=OTHER", "event_type=3", "=3"])
def test_send_param_takes_only_kuaishou_parameters(database, pair):
    result = send(database, "form", "--callback", "CLICK-1", "--param", pair, check=False)

    assert result.returncode == 2
    assert f"{pair!r} is not NAME=VALUE with NAME one of purchase_amount," in result.stderr
    assert stored(database) == []


def test_send_refuses_a_param_that_is_not_name_value(database):
    result = send(database, "120", "--callback", "CLICK-1", "--param", "action_reason", check=False)
    assert result.returncode == 2
    assert "'action_reason' is not NAME=VALUE" in result.stderr


def test_send_answers_duplicate_for_a_second_registration(database):
    send(database, "registration", "--callback", "CLICK-1")
    result = send(database, "registration", "--callback", "CLICK-1")

    [row] = stored(database)
    assert result.stdout == f"duplicate: event {row['id']} ({row['event_id']})\n"


def test_send_resolves_a_lead_id_from_the_tag(database):
    store = open_store(database)
    received = now_ms()
    tag_form = Conversion(9, "CLICK-77", received, received, "tag", lead_id="L-9")
    store.add_conversions([tag_form], frozenset())
    store.close()

    send(database, "deal", "--lead-id", "L-9")
    assert [(row["event_type"], row["callback"]) for row in stored(database)] == [
        (9, "CLICK-77"),
        (119, "CLICK-77"),
    ]


def test_send_refuses_an_unknown_lead_id(database):
    result = send(database, "deal", "--lead-id", "L-404", check=False)
    assert result.returncode == 1
    assert result.stderr == "Error: lead_id L-404 is unknown\n"
    assert stored(database) == []


def test_send_to_a_store_without_schema_fails_without_a_traceback(sqlite_url):
    # A database file that exists but was never migrated (a missing one is refused earlier).
    with closing(sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))) as database:
        database.execute("CREATE TABLE unrelated (x)")

    result = send(sqlite_url, "form", "--callback", "CLICK-1", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: event not queued: ")
    assert "Traceback" not in result.stderr


def test_events_lists_the_newest_first_with_their_state(database):
    send(database, "form", "--callback", "CLICK-FORM-1")
    send(database, "payment", "--callback", "CLICK-PAY-1", "--amount", "3")

    lines = run_cli(["events"], database_url=database).stdout.splitlines()
    assert lines[0].split() == [
        "id",
        "received",
        "(UTC)",
        "type",
        "status",
        "tries",
        "callback",
        "last",
        "answer",
    ]
    assert [line.split()[3:7] for line in lines[1:]] == [
        ["payment", "pending", "0", "CLICK-PAY-1"],
        ["form", "pending", "0", "CLICK-FORM-1"],
    ]


def test_events_filters_by_type_and_prints_json(database):
    send(database, "form", "--callback", "CLICK-1")
    send(database, "payment", "--callback", "CLICK-1", "--amount", "3")

    output = run_cli(["events", "--type", "3", "--json"], database_url=database).stdout
    [row] = [json.loads(line) for line in output.splitlines()]
    assert (row["event_type"], row["params"], row["status"]) == (
        3,
        {"purchase_amount": "3.00"},
        "pending",
    )


def test_an_event_sent_from_the_cli_is_relayed_like_any_other(database, mock_kuaishou):
    send(database, "payment", "--callback", "CLICK-CLI-1", "--amount", "9.9")

    with RelayProcess(database_url=database, upstream_url=mock_kuaishou.url):
        [call] = mock_kuaishou.wait_for_requests(1)

    assert call["params"]["callback"] == ["CLICK-CLI-1"]
    assert call["params"]["event_type"] == ["3"]
    assert call["params"]["purchase_amount"] == ["9.90"]
