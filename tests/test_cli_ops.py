"""``ks-collector check`` and ``ks-collector stats``, run as an operator runs them.

``check`` is pointed at the mock Kuaishou or at a closed local port, never at the real host.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from collector.store import AttemptResult, Outcome, SqlStore, open_store
from collector.validation import Conversion, now_ms
from tests.fault.helpers import write_lock_held
from tests.support.processes import (
    UNREACHABLE_UPSTREAM,
    cli_command,
    collector_env,
    free_port,
    run_cli,
)

API_TOKEN = "crm-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
DECODE_FAILURE = "callbackinfo decodedfailure"


# ---- helpers -----------------------------------------------------------------------------------


def check(
    database_url: str, upstream_url: str = UNREACHABLE_UPSTREAM, **settings: str
) -> tuple[int, dict[str, tuple[str, str]]]:
    """Run ``check``; (exit code, {check name: (level, message)})."""
    env = {f"KS_COLLECTOR_{name.upper()}": value for name, value in settings.items()}
    result = run_cli(
        ["check"], env, database_url=database_url, upstream_url=upstream_url, check=False
    )
    findings = {}
    for line in result.stdout.splitlines():
        level, name, message = line[:5].strip(), line[6:22].strip(), line[23:]
        findings[name] = (level, message)
    return result.returncode, findings


def migrated_store(database_url: str) -> SqlStore:
    store = open_store(database_url)
    store.migrate()
    return store


def add_events(store: SqlStore, *specs: tuple[int, str]) -> list[int]:
    """Queue (event type, callback) pairs now; returns their outbox ids."""
    at = now_ms()
    conversions = [Conversion(code, callback, at, at, "api") for code, callback in specs]
    return [accepted.id for accepted in store.add_conversions(conversions, frozenset())]


def settle(store: SqlStore, outcomes: dict[int, str]) -> None:
    """Finish events as a relay would: delivered, rejected (decode failure) or dead (HTTP 503)."""
    now = now_ms()
    results = []
    for event in store.claim_due("test-relay", 10_000, now + 1, 60_000):
        state = outcomes.get(event.id)
        if state == "delivered":
            results.append(AttemptResult(event, Outcome.DELIVERED, now, 5, 200, "{}", None))
        elif state == "rejected":
            results.append(
                AttemptResult(event, Outcome.REJECTED, now, 5, 200, "{}", DECODE_FAILURE)
            )
        elif state == "dead":
            results.append(
                AttemptResult(event, Outcome.TRANSIENT, now, 5, 503, "", "HTTP 503", dead=True)
            )
    store.record_attempts("test-relay", results)
    store.release_leases("test-relay")


def with_fresh_relay(database_url: str) -> str:
    """Migrate the store and record a relay heartbeat from a second ago."""
    store = migrated_store(database_url)
    store.beat("relay-1", now_ms() - 1000)
    store.close()
    return database_url


@pytest.fixture
def ready_store(sqlite_url) -> str:
    """A migrated SQLite store with a relay that reported in a second ago."""
    return with_fresh_relay(sqlite_url)


@pytest.fixture
def ready_any_store(database_url) -> str:
    """The same, once on SQLite and once on PostgreSQL."""
    return with_fresh_relay(database_url)


# ---- check: the whole picture ------------------------------------------------------------------


def test_check_passes_when_everything_is_set_and_reachable(ready_any_store, mock_kuaishou):
    code, findings = check(
        ready_any_store,
        mock_kuaishou.url,
        allowed_origins="https://shop.example.com",
        api_tokens=f"crm:{API_TOKEN}",
        admin_token=ADMIN_TOKEN,
    )

    assert code == 0
    assert {name: level for name, (level, _) in findings.items()} == {
        "config": "ok",
        "store": "ok",
        "relay": "ok",
        "outbox": "ok",
        "upstream": "warn",  # the mock is not Kuaishou's endpoint
        "allowed origins": "ok",
        "api tokens": "ok",
        "admin token": "ok",
        "logging": "ok",
    }
    assert mock_kuaishou.requests() == []


def test_check_exits_zero_with_warnings_only(ready_store, mock_kuaishou):
    code, findings = check(ready_store, mock_kuaishou.url)

    assert code == 0
    assert {level for level, _ in findings.values()} == {"ok", "warn"}


def test_an_unparsable_setting_is_the_one_failure_reported(sqlite_url):
    code, findings = check(sqlite_url, relay_concurrency="0")

    assert code == 1
    assert findings == {
        "config": ("fail", "KS_COLLECTOR_RELAY_CONCURRENCY='0': must be greater than zero")
    }


# ---- check: the store --------------------------------------------------------------------------


def test_a_migrated_writable_store_is_ok(ready_any_store):
    _, findings = check(ready_any_store)

    level, message = findings["store"]
    assert level == "ok"
    assert message.endswith(": schema version 1, writable")


def test_a_missing_sqlite_file_fails_and_is_not_created(tmp_path):
    path = tmp_path / "nowhere.db"

    code, findings = check(f"sqlite:///{path}")

    assert code == 1
    assert findings["store"] == (
        "fail",
        f"no database at {path}: run this where the collector runs, set "
        "KS_COLLECTOR_DATABASE_URL to its database, or create one with ks-collector migrate",
    )
    assert findings["relay"] == ("fail", "not checked: the store is not usable")
    assert not path.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["events"],
        ["replay", "--since", "24h"],
        ["purge", "--older-than", "30d"],
        ["send", "form", "--callback", "CB-1"],
        ["relay", "--no-migrate"],
        ["web", "--no-migrate", "--bind", "127.0.0.1:0"],
    ],
    ids=lambda command: command[0],
)
def test_commands_run_away_from_the_database_say_where_they_looked_and_create_nothing(
    tmp_path, command
):
    # The default URL is relative: run from another directory, it names no database there.
    result = subprocess.run(
        [*cli_command(), *command],
        cwd=tmp_path,
        env=collector_env(database_url="sqlite:///ks-collector.db"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert result.stderr == (
        f"Error: no database at {tmp_path}/ks-collector.db (ks-collector.db is relative to "
        f"{tmp_path}): run this where the collector runs, set KS_COLLECTOR_DATABASE_URL to its "
        "database, or create one with ks-collector migrate\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_store_that_was_never_migrated_fails(database_url):
    if database_url.startswith("sqlite:"):
        sqlite3.connect(database_url.removeprefix("sqlite:///")).close()

    code, findings = check(database_url)

    assert code == 1
    level, message = findings["store"]
    assert level == "fail"
    assert message.endswith(": no schema, this version needs 1: run ks-collector migrate")


def test_an_unreachable_postgresql_fails_without_showing_its_password():
    url = f"postgresql://ks:s3cret-pw@127.0.0.1:{free_port()}/ks"

    code, findings = check(url)

    assert code == 1
    level, message = findings["store"]
    assert level == "fail"
    assert message.startswith(f"postgresql://ks:***@127.0.0.1:{url.split(':')[3]}")
    assert "s3cret-pw" not in message


def test_a_schema_newer_than_this_version_is_a_warning(sqlite_url):
    store = migrated_store(sqlite_url)
    with store.transaction() as cursor:
        cursor.execute("INSERT INTO schema_migrations (version, applied_at_ms) VALUES (99, 0)")
    store.close()

    _, findings = check(sqlite_url)

    assert findings["store"][0] == "warn"
    assert findings["store"][1].endswith(
        "schema version 99 is newer than this ks-collector knows (1): upgrade ks-collector"
    )


# ---- check: relay and outbox -------------------------------------------------------------------


def test_no_relay_heartbeat_fails(database_url):
    migrated_store(database_url).close()

    code, findings = check(database_url)

    assert code == 1
    assert findings["relay"] == (
        "fail",
        "no relay heartbeat yet: is a relay running against this store?",
    )


def test_a_stale_relay_heartbeat_fails(sqlite_url):
    store = migrated_store(sqlite_url)
    store.beat("relay-1", now_ms() - 31_000)
    store.close()

    code, findings = check(sqlite_url)

    assert code == 1
    assert findings["relay"] == ("fail", "no relay heartbeat in the last 30 s")


def test_fresh_heartbeats_are_counted_per_relay(sqlite_url):
    store = migrated_store(sqlite_url)
    for name, age_ms in (("relay-1", 1000), ("relay-2", 2000), ("relay-gone", 600_000)):
        store.beat(name, now_ms() - age_ms)
    store.close()

    _, findings = check(sqlite_url)

    level, message = findings["relay"]
    assert level == "ok"
    assert message.startswith("last heartbeat ") and message.endswith(" s ago, 2 relays running")


def test_dead_events_make_the_outbox_a_warning(ready_store):
    store = open_store(ready_store)
    ids = add_events(store, (9, "CLICK-1"), (9, "CLICK-2"), (9, "CLICK-3"))
    settle(store, {ids[0]: "dead", ids[1]: "delivered"})
    store.close()

    _, findings = check(ready_store)

    level, message = findings["outbox"]
    assert level == "warn"
    assert message.startswith("1 pending, oldest ")
    assert message.endswith("; 1 dead (ks-collector events --status dead; ks-collector replay)")


# ---- check: upstream ---------------------------------------------------------------------------


def test_an_upstream_that_refuses_connections_fails(ready_store):
    port = free_port()

    code, findings = check(ready_store, f"http://127.0.0.1:{port}/track/activate")

    assert code == 1
    assert findings["upstream"] == (
        "fail",
        f"cannot connect to 127.0.0.1:{port}: Connection refused",
    )


def test_a_reachable_mock_upstream_is_named_as_not_kuaishou(ready_store, mock_kuaishou):
    _, findings = check(ready_store, mock_kuaishou.url)

    level, message = findings["upstream"]
    assert level == "warn"
    assert message.startswith(f"127.0.0.1:{mock_kuaishou.port} accepts connections (")
    assert message.endswith(
        "; not Kuaishou's endpoint http://ad.partner.gifshow.com/track/activate"
    )


# ---- check: settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origins", "expected"),
    [
        (
            "",
            (
                "warn",
                "KS_COLLECTOR_ALLOWED_ORIGINS is empty: any page may send tag events, and "
                "serve/web refuse to listen on a public address",
            ),
        ),
        ("*", ("warn", "'*': any page on the internet may send events")),
        (
            "https://a.example.com,*.example.org",
            ("ok", "2: https://a.example.com, *.example.org"),
        ),
    ],
)
def test_the_origin_allowlist_is_reported(ready_store, origins, expected):
    _, findings = check(ready_store, allowed_origins=origins)

    assert findings["allowed origins"] == expected


def test_api_tokens_are_listed_by_name_never_by_value(ready_store):
    tokens = f"crm:{API_TOKEN},shop:shop-token-0123456789abcdef"

    _, findings = check(ready_store, api_tokens=tokens)

    assert findings["api tokens"] == ("ok", "2: crm, shop")


def test_no_api_tokens_is_a_warning(ready_store):
    _, findings = check(ready_store)

    assert findings["api tokens"] == ("warn", "none set: /api/v1/conversions answers 401")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", ("warn", "not set: the /admin dashboard is off")),
        ("short-token", ("warn", "only 11 characters: use 16 or more")),
        (ADMIN_TOKEN, ("ok", "set: /admin is on")),
    ],
)
def test_the_admin_token_is_reported(ready_store, token, expected):
    _, findings = check(ready_store, admin_token=token)

    assert findings["admin token"] == expected
    assert ADMIN_TOKEN not in json.dumps(findings)


def test_an_unknown_log_format_or_level_is_a_configuration_failure(ready_store):
    code, findings = check(ready_store, log_format="xml")
    assert code == 1
    assert findings["config"] == ("fail", "KS_COLLECTOR_LOG_FORMAT='xml': expected text or json")

    code, findings = check(ready_store, log_level="LOUD")
    assert code == 1
    assert findings["config"] == (
        "fail",
        "KS_COLLECTOR_LOG_LEVEL='LOUD': expected DEBUG, INFO, WARNING, ERROR or CRITICAL",
    )


def test_a_bad_log_level_is_a_one_line_error_for_every_command(sqlite_url):
    result = run_cli(
        ["events"], {"KS_COLLECTOR_LOG_LEVEL": "LOUD"}, database_url=sqlite_url, check=False
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "KS_COLLECTOR_LOG_LEVEL='LOUD'" in result.stderr


# ---- stats -------------------------------------------------------------------------------------


@pytest.fixture
def busy_store(sqlite_url) -> str:
    """Forms: 3 delivered, 2 rejected, 1 pending; WeChat copies: 1 delivered, 1 dead."""
    store = migrated_store(sqlite_url)
    ids = add_events(
        store,
        *[(9, f"FORM-{n}") for n in range(6)],
        (64, "COPY-1"),
        (64, "COPY-2"),
    )
    settle(
        store,
        {ids[0]: "delivered", ids[1]: "delivered", ids[2]: "delivered"}
        | {ids[3]: "rejected", ids[4]: "rejected", ids[6]: "delivered", ids[7]: "dead"},
    )
    old = now_ms() - 3 * 86_400_000
    store.add_conversions([Conversion(9, "OLD-FORM", old, old, "api")], frozenset())
    store.close()
    return sqlite_url


def test_stats_counts_each_event_type_by_state_with_totals(busy_store):
    lines = run_cli(["stats"], database_url=busy_store).stdout.splitlines()

    assert lines[0].startswith("events received since ")
    assert [line.split() for line in lines[1:5]] == [
        ["event", "type", "pending", "delivered", "rejected", "dead", "total"],
        ["9", "form", "1", "3", "2", "0", "6"],
        ["64", "wechat_copy", "0", "1", "0", "1", "2"],
        ["all", "1", "4", "2", "1", "8"],
    ]
    assert lines[5] == "delivered: 50.0% of 8"


def test_stats_says_why_events_were_not_delivered(busy_store):
    lines = run_cli(["stats"], database_url=busy_store).stdout.splitlines()

    assert lines[6:] == [
        "why events were not delivered:",
        f"      2  rejected  {DECODE_FAILURE}",
        "      1  dead      HTTP 503",
    ]


def test_stats_window_reaches_back_as_far_as_asked(busy_store):
    lines = run_cli(["stats", "--since", "4d"], database_url=busy_store).stdout.splitlines()

    assert lines[2].split() == ["9", "form", "2", "3", "2", "0", "7"]


def test_stats_of_an_empty_window(busy_store):
    stdout = run_cli(["stats", "--since", "2099-01-01"], database_url=busy_store).stdout

    assert stdout.splitlines()[-1] == "(no events in this window)"


def test_stats_as_json_lines(busy_store):
    stdout = run_cli(["stats", "--json"], database_url=busy_store).stdout

    assert [json.loads(line) for line in stdout.splitlines()] == [
        {"event_type": 9, "name": "form", "pending": 1, "delivered": 3, "rejected": 2, "dead": 0},
        {
            "event_type": 64,
            "name": "wechat_copy",
            "pending": 0,
            "delivered": 1,
            "rejected": 0,
            "dead": 1,
        },
    ]


def test_stats_on_a_store_that_cannot_be_read_fails_without_a_traceback(tmp_path):
    path = Path(tmp_path) / "empty.db"
    sqlite3.connect(path).close()

    result = run_cli(["stats"], database_url=f"sqlite:///{path}", check=False)

    assert result.returncode == 1
    assert result.stderr.startswith("Error: SQLite read failed: no such table: events")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [["purge", "--older-than", "30d"], ["replay", "--since", "24h"]],
    ids=lambda command: command[0],
)
def test_a_locked_store_is_a_one_line_error_not_a_traceback(sqlite_url, command):
    migrated_store(sqlite_url).close()

    with write_lock_held(sqlite_url):
        result = run_cli(command, database_url=sqlite_url, check=False)

    assert result.returncode == 1
    assert result.stderr.startswith("Error: the store is unavailable: SQLite could not start")
    assert "Traceback" not in result.stderr
