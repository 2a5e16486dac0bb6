"""``ks-collector``: run the collector, and answer questions about the outbox."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import click

from . import catalog
from .config import Config, ConfigError
from .logs import configure_logging
from .store import MAX_INT64, SqlStore, StoreUnavailable, open_store
from .validation import EventRefused, now_ms, validate_api_event

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_LONGEST_DURATION_MS = 100 * 366 * 86_400_000


def parse_duration_ms(text: str) -> int:
    """``90s``, ``15m``, ``24h``, ``30d`` → milliseconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 24h or 30d")
    duration = int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    if duration > _LONGEST_DURATION_MS:
        raise click.BadParameter(f"{text!r} is longer than a hundred years")
    return duration


def parse_time_ms(text: str) -> int:
    """An ISO date/time (UTC unless it says otherwise) or a duration ago (``2h``)."""
    if _DURATION.match(text.strip()):
        return now_ms() - parse_duration_ms(text)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an ISO time nor a duration") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def format_ms(value: int | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


class Context:
    """Configuration and the store, opened once per command."""

    def __init__(self) -> None:
        try:
            self.config = Config.from_env()
        except ConfigError as error:
            raise click.ClickException(str(error)) from None
        configure_logging(self.config.log_format, self.config.log_level)
        self._store: SqlStore | None = None

    @property
    def store(self) -> SqlStore:
        """The configured store; only ``migrate`` may bring a new SQLite file into being."""
        if self._store is None:
            self.require_database()
            self._store = self._open_store()
        return self._store

    def require_database(self) -> None:
        problem = missing_sqlite_file(self.config.database_url)
        if problem:
            raise click.ClickException(problem)

    def _open_store(self) -> SqlStore:
        try:
            return open_store(self.config.database_url)
        except (ValueError, RuntimeError) as error:
            raise click.ClickException(str(error)) from None

    def migrate(self) -> None:
        if self._store is None:
            self._store = self._open_store()
        try:
            applied = self._store.migrate()
        except StoreUnavailable as error:
            raise click.ClickException(f"cannot migrate the store: {error}") from None
        if applied:
            # A log line, not a bare echo: with KS_COLLECTOR_LOG_FORMAT=json every line is JSON.
            logging.getLogger("ks_collector.store").info("applied schema migrations %s", applied)


pass_context = click.make_pass_decorator(Context, ensure=True)


def missing_sqlite_file(url: str) -> str | None:
    """Why a SQLite URL names no database yet, or None. Opening it would create an empty file
    where the user meant to read the real one, typically from another working directory."""
    from .store.sqlite import path_from_url

    if not url.startswith("sqlite:"):
        return None
    try:
        relative = path_from_url(url)
    except ValueError as error:
        return str(error)
    path = os.path.abspath(relative)
    if os.path.isfile(path):
        return None
    where = "" if os.path.isabs(relative) else f" ({relative} is relative to {os.getcwd()})"
    return (
        f"no database at {path}{where}: run this where the collector runs, set "
        "KS_COLLECTOR_DATABASE_URL to its database, or create one with ks-collector migrate"
    )


class _Commands(click.Group):
    """Every command: a store that stops answering is a one-line error, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreUnavailable as error:
            raise click.ClickException(f"the store is unavailable: {error}") from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ks-collector")
def main() -> None:
    """Kuaishou conversion collector: tag beacons and server events in, durable relay out.

    Settings come from KS_COLLECTOR_* environment variables (see the README).
    """


_bind = click.option(
    "--bind", default="127.0.0.1:8000", show_default=True, help="Address to listen on."
)
_workers = click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="gunicorn worker processes.",
)
_threads = click.option(
    "--threads",
    default=4,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Threads per worker.",
)
_no_migrate = click.option(
    "--no-migrate", is_flag=True, hidden=True, help="Skip migrations (serve has run them already)."
)


@main.command()
@_bind
@_workers
@_threads
@pass_context
def serve(ctx: Context, bind: str, workers: int, threads: int) -> None:
    """Run everything on one machine: migrations, the web server and a relay."""
    from .server import check_bind_is_safe
    from .server import serve as run_serve

    check_bind_is_safe(bind, ctx.config)
    ctx.migrate()
    sys.exit(run_serve(bind, workers, threads, ctx.config))


@main.command()
@_bind
@_workers
@_threads
@_no_migrate
@pass_context
def web(ctx: Context, bind: str, workers: int, threads: int, no_migrate: bool) -> None:
    """Run only the web server (gunicorn), for machines that take traffic."""
    from .server import check_bind_is_safe, run_web

    check_bind_is_safe(bind, ctx.config)
    if no_migrate:
        ctx.require_database()
    else:
        ctx.migrate()
    run_web(bind, workers, threads)


@main.command()
@_no_migrate
@pass_context
def relay(ctx: Context, no_migrate: bool) -> None:
    """Run only a relay; any number may share one PostgreSQL store."""
    from .server import run_relay

    if no_migrate:
        ctx.require_database()
    else:
        ctx.migrate()
    run_relay(ctx.config)


@main.command()
@pass_context
def migrate(ctx: Context) -> None:
    """Create or upgrade the store's schema."""
    ctx.migrate()
    click.echo("schema is up to date")


@main.command()
@click.argument("event")
@click.option("--callback", help="The click id (or use --lead-id).")
@click.option("--lead-id", help="A lead id a tag event carried, instead of --callback.")
@click.option("--amount", help="purchase_amount in yuan.")
@click.option("--event-time", help="13-digit milliseconds; default now.")
@click.option("--event-id", help="Idempotency key.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Another Kuaishou parameter, e.g. --param action_reason=4.",
)
@pass_context
def send(
    ctx: Context,
    event: str,
    callback: str | None,
    lead_id: str | None,
    amount: str | None,
    event_time: str | None,
    event_id: str | None,
    params: tuple[str, ...],
) -> None:
    """Queue one conversion through the same validation as the API (for support and tests)."""
    body: dict[str, Any] = {"event_type": event}
    for name, value in (
        ("callback", callback),
        ("lead_id", lead_id),
        ("purchase_amount", amount),
        ("event_time", event_time),
        ("event_id", event_id),
    ):
        if value is not None:
            body[name] = value
    for pair in params:
        name, sep, value = pair.partition("=")
        if not sep or name.strip() not in catalog.KUAISHOU_PARAMETERS:
            raise click.BadParameter(
                f"{pair!r} is not NAME=VALUE with NAME one of "
                f"{', '.join(catalog.KUAISHOU_PARAMETERS)}",
                param_hint="--param",
            )
        body[name.strip()] = value
    config = ctx.config
    try:
        conversion = validate_api_event(
            body,
            received_at_ms=now_ms(),
            source="cli",
            max_age_ms=int(config.max_event_age_days * 86_400_000),
        )
    except EventRefused as refused:
        for name, messages in refused.errors.items():
            click.echo(f"{name}: {'; '.join(messages)}", err=True)
        raise click.ClickException("event refused") from None
    store = ctx.store
    try:
        if conversion.callback is None:
            known = store.resolve_leads([conversion.lead_id])
            if conversion.lead_id not in known:
                raise click.ClickException(f"lead_id {conversion.lead_id} is unknown")
            conversion.callback = known[conversion.lead_id]
        [result] = store.add_conversions([conversion], config.once_per_callback)
    except StoreUnavailable as error:
        raise click.ClickException(f"event not queued: {error}") from None
    click.echo(f"{result.status}: event {result.id} ({result.event_id})")


@main.command()
@click.option("--status", type=click.Choice(["pending", "delivered", "rejected", "dead"]))
@click.option("--type", "event_type", help="Event code or name.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def events(
    ctx: Context, status: str | None, event_type: str | None, limit: int, as_json: bool
) -> None:
    """List recent events with their delivery state, newest first."""
    code = None
    if event_type:
        found = catalog.lookup(event_type)
        if found is None:
            raise click.BadParameter(f"{event_type!r} is not an event type", param_hint="--type")
        code = found.code
    try:
        rows = ctx.store.list_events(status=status, event_type=code, limit=limit)
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    click.echo(
        f"{'id':>7}  {'received (UTC)':19}  {'type':22}  {'status':9}  {'tries':>5}  "
        f"{'callback':12}  last answer"
    )
    for row in rows:
        name = (
            catalog.BY_CODE[row["event_type"]].name
            if row["event_type"] in catalog.BY_CODE
            else str(row["event_type"])
        )
        answer = row["last_error"] or (row["last_response"] or "")
        click.echo(
            f"{row['id']:>7}  {format_ms(row['received_at_ms'])}  {name:22}  "
            f"{row['status']:9}  {row['attempts']:>5}  {row['callback'][:12]:12}  "
            f"{answer[:60]}"
        )


@main.command()
@click.option(
    "--id", "ids", multiple=True, type=click.IntRange(1, MAX_INT64), help="Event id (repeatable)."
)
@click.option("--since", help="Received at or after: ISO time or a duration ago (24h).")
@click.option("--until", help="Received before: ISO time or a duration ago.")
@click.option("--error", "error_contains", help="Only events whose last answer contains this.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["dead", "rejected"]),
    help="Which final states to re-queue (default: both).",
)
@pass_context
def replay(
    ctx: Context,
    ids: tuple[int, ...],
    since: str | None,
    until: str | None,
    error_contains: str | None,
    statuses: tuple[str, ...],
) -> None:
    """Send dead or rejected events again."""
    if not (ids or since or until or error_contains):
        raise click.UsageError("say which events: --id, --since/--until or --error")
    count = ctx.store.requeue(
        now_ms(),
        ids=ids,
        statuses=statuses or ("dead", "rejected"),
        since_ms=parse_time_ms(since) if since else None,
        until_ms=parse_time_ms(until) if until else None,
        error_contains=error_contains,
    )
    wanted = " or ".join(statuses or ("dead", "rejected"))
    note = "" if count else f" (no {wanted} event matched: only those can be replayed)"
    click.echo(f"re-queued {count} event{'s' if count != 1 else ''}{note}")


@main.command()
@click.option("--older-than", required=True, help="Age of delivered events to delete, e.g. 30d.")
@pass_context
def purge(ctx: Context, older_than: str) -> None:
    """Delete delivered events (and their attempts) older than a duration. Nothing else.

    A purged event no longer makes a resent copy a duplicate, so nothing younger than
    KS_COLLECTOR_MAX_EVENT_AGE_DAYS (the oldest event_time the API takes) can be purged.
    """
    age_ms = parse_duration_ms(older_than)
    youngest_ms = int(ctx.config.max_event_age_days * 86_400_000)
    if age_ms < youngest_ms:
        raise click.BadParameter(
            f"{older_than!r} is younger than KS_COLLECTOR_MAX_EVENT_AGE_DAYS "
            f"({ctx.config.max_event_age_days:g} days): a client could still resend those "
            "events, and once purged they would be relayed again",
            param_hint="--older-than",
        )
    count = ctx.store.purge_delivered(now_ms() - age_ms)
    click.echo(f"purged {count} delivered event{'s' if count != 1 else ''}")


# States in the order `stats` prints them.
STATS_STATES = ("pending", "delivered", "rejected", "dead")


@main.command()
@click.option("--since", default="24h", show_default=True, help="Window: duration or ISO time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event type.")
@pass_context
def stats(ctx: Context, since: str, as_json: bool) -> None:
    """Counts by event type and delivery state over a window, and why events failed."""
    since_ms = parse_time_ms(since)
    try:
        counts = ctx.store.count_by_type_and_status(since_ms)
        reasons = ctx.store.rejection_reasons(since_ms, limit=5)
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from None
    table: dict[int, dict[str, int]] = {}
    for code, status, count in counts:
        table.setdefault(code, dict.fromkeys(STATS_STATES, 0))[status] = count
    if as_json:
        for code, row in sorted(table.items()):
            name = catalog.BY_CODE[code].name if code in catalog.BY_CODE else None
            click.echo(json.dumps({"event_type": code, "name": name, **row}))
        return

    click.echo(f"events received since {format_ms(since_ms)} UTC")
    columns = (*STATS_STATES, "total")
    click.echo(f"{'event type':28}" + "".join(f"{column:>11}" for column in columns))
    totals = dict.fromkeys(STATS_STATES, 0)
    for code, row in sorted(table.items()):
        name = catalog.BY_CODE[code].name if code in catalog.BY_CODE else "?"
        cells = [row[state] for state in STATS_STATES] + [sum(row.values())]
        click.echo(f"{f'{code} {name}':28}" + "".join(f"{cell:>11}" for cell in cells))
        for state in STATS_STATES:
            totals[state] += row[state]
    if not table:
        click.echo("(no events in this window)")
        return
    received = sum(totals.values())
    cells = [totals[state] for state in STATS_STATES] + [received]
    click.echo(f"{'all':28}" + "".join(f"{cell:>11}" for cell in cells))
    click.echo(f"delivered: {totals['delivered'] / received:.1%} of {received}")
    if reasons:
        click.echo("why events were not delivered:")
        for status, reason, count in reasons:
            click.echo(f"{count:>7}  {status:8}  {reason or '(no answer recorded)'}")


# ---- check -----------------------------------------------------------------------------------

# How long `check` waits for Kuaishou's host to accept a TCP connection.
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 3.0
# Pending this long suggests the relay cannot keep up or cannot reach Kuaishou.
OLD_PENDING_WARNING_MS = 3_600_000
# Admin tokens shorter than this are easy to guess through the login form.
MIN_ADMIN_TOKEN_LENGTH = 16


class Finding:
    """One line of `ks-collector check`: ok, warn or fail, what was checked, and what was seen."""

    def __init__(self, level: str, name: str, message: str):
        self.level, self.name, self.message = level, name, message

    def __str__(self) -> str:
        return f"{self.level:<5} {self.name:<16} {self.message}"


def redacted_url(url: str) -> str:
    """A database URL fit to print: the password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_store(config: Config) -> tuple[Finding, SqlStore | None]:
    """Reachable, migrated to this version's schema, and writable; the store is kept if so."""
    from .store.schema import LATEST_VERSION

    shown = redacted_url(config.database_url)
    # Opening a missing SQLite file would create an empty one; a check must change nothing.
    problem = missing_sqlite_file(config.database_url)
    if problem:
        return Finding("fail", "store", problem), None
    try:
        store = open_store(config.database_url)
    except (ValueError, RuntimeError) as error:
        return Finding("fail", "store", str(error)), None
    try:
        version = store.schema_version()
        if version is None or version < LATEST_VERSION:
            store.close()
            found = "no schema" if version is None else f"schema version {version}"
            message = (
                f"{shown}: {found}, this version needs {LATEST_VERSION}: run ks-collector migrate"
            )
            return Finding("fail", "store", message), None
        store.check_writable()
    except StoreUnavailable as error:
        store.close()
        return Finding("fail", "store", f"{shown}: {error}"), None
    if version > LATEST_VERSION:
        message = (
            f"{shown}: schema version {version} is newer than this ks-collector knows "
            f"({LATEST_VERSION}): upgrade ks-collector"
        )
        return Finding("warn", "store", message), store
    return Finding("ok", "store", f"{shown}: schema version {version}, writable"), store


def check_relay(store: SqlStore) -> Finding:
    from .web.pages import relay_heartbeat_problem

    now = now_ms()
    beats = [beat for _, beat in store.relay_heartbeats()]
    problem = relay_heartbeat_problem(beats[0] if beats else None, now)
    if problem:
        return Finding("fail", "relay", problem)
    alive = sum(1 for beat in beats if relay_heartbeat_problem(beat, now) is None)
    age = (now - beats[0]) / 1000
    running = f"{alive} relay{'s' if alive != 1 else ''} running"
    return Finding("ok", "relay", f"last heartbeat {age:.0f} s ago, {running}")


def check_outbox(store: SqlStore) -> Finding:
    pending, oldest_ms = store.pending_summary(now_ms())
    dead = store.count_status("dead")
    message = f"{pending} pending"
    if oldest_ms is not None:
        message += f", oldest {oldest_ms // 1000} s"
    message += f"; {dead} dead"
    if dead:
        message += " (ks-collector events --status dead; ks-collector replay)"
    old = oldest_ms is not None and oldest_ms > OLD_PENDING_WARNING_MS
    return Finding("warn" if dead or old else "ok", "outbox", message)


def check_upstream(config: Config) -> Finding:
    """A TCP connection to the upstream's host and port: nothing is sent, no event, no request."""
    from .config import KUAISHOU_ACTIVATE_URL

    parts = urlsplit(config.upstream_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Finding("fail", "upstream", f"{config.upstream_url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = min(config.upstream_timeout_seconds, UPSTREAM_CONNECT_TIMEOUT_SECONDS)
    started = time.monotonic()
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else error.strerror or str(error)
        return Finding("fail", "upstream", f"cannot connect to {parts.hostname}:{port}: {reason}")
    took = (time.monotonic() - started) * 1000
    message = f"{parts.hostname}:{port} accepts connections ({took:.0f} ms)"
    if config.upstream_url != KUAISHOU_ACTIVATE_URL:
        message += f"; not Kuaishou's endpoint {KUAISHOU_ACTIVATE_URL}"
        return Finding("warn", "upstream", message)
    return Finding("ok", "upstream", message)


def check_origins(config: Config) -> Finding:
    origins = config.allowed_origins
    if not origins:
        return Finding(
            "warn",
            "allowed origins",
            "KS_COLLECTOR_ALLOWED_ORIGINS is empty: any page may send tag events, and "
            "serve/web refuse to listen on a public address",
        )
    if "*" in origins:
        return Finding("warn", "allowed origins", "'*': any page on the internet may send events")
    return Finding("ok", "allowed origins", f"{len(origins)}: {', '.join(origins)}")


def check_api_tokens(config: Config) -> Finding:
    names = sorted(config.api_tokens.values())
    if not names:
        return Finding("warn", "api tokens", "none set: /api/v1/conversions answers 401")
    return Finding("ok", "api tokens", f"{len(names)}: {', '.join(names)}")


def check_admin_token(config: Config) -> Finding:
    token = config.admin_token
    if not token:
        return Finding("warn", "admin token", "not set: the /admin dashboard is off")
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        return Finding(
            "warn",
            "admin token",
            f"only {len(token)} characters: use {MIN_ADMIN_TOKEN_LENGTH} or more",
        )
    return Finding("ok", "admin token", "set: /admin is on")


def check_logging(config: Config) -> Finding:
    return Finding("ok", "logging", f"{config.log_format}, {config.log_level}")


@main.command()
def check() -> None:
    """Diagnose this machine's setup: one line per check; exits 1 if any check fails.

    Checks the settings, the store (reachable, migrated, writable), the relays' heartbeat, the
    outbox, and whether Kuaishou's host accepts a TCP connection (nothing is sent to it).
    """
    try:
        config = Config.from_env()
    except ConfigError as error:
        click.echo(Finding("fail", "config", str(error)))
        sys.exit(1)
    findings = [Finding("ok", "config", "every KS_COLLECTOR_* setting parses")]
    store_finding, store = check_store(config)
    findings.append(store_finding)
    if store is None:
        findings.append(Finding("fail", "relay", "not checked: the store is not usable"))
    else:
        try:
            findings += [check_relay(store), check_outbox(store)]
        except StoreUnavailable as error:
            findings.append(Finding("fail", "relay", f"store stopped answering: {error}"))
        finally:
            store.close()
    findings += [
        check_upstream(config),
        check_origins(config),
        check_api_tokens(config),
        check_admin_token(config),
        check_logging(config),
    ]
    for finding in findings:
        click.echo(finding)
    if any(finding.level == "fail" for finding in findings):
        sys.exit(1)
