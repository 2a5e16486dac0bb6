"""``ks-collector``: run the collector, and answer questions about the outbox."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from typing import Any

import click

from . import catalog
from .config import Config, ConfigError
from .logs import configure_logging
from .store import SqlStore, StoreUnavailable, open_store
from .validation import EventRefused, now_ms, validate_api_event

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """``90s``, ``15m``, ``24h``, ``30d`` → milliseconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 24h or 30d")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


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
        if self._store is None:
            try:
                self._store = open_store(self.config.database_url)
            except (ValueError, RuntimeError) as error:
                raise click.ClickException(str(error)) from None
        return self._store

    def migrate(self) -> None:
        try:
            applied = self.store.migrate()
        except StoreUnavailable as error:
            raise click.ClickException(f"cannot migrate the store: {error}") from None
        if applied:
            click.echo(f"applied schema migrations {applied}", err=True)


pass_context = click.make_pass_decorator(Context, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    from .server import serve as run_serve

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
    if not no_migrate:
        ctx.migrate()
    run_web(bind, workers, threads)


@main.command()
@_no_migrate
@pass_context
def relay(ctx: Context, no_migrate: bool) -> None:
    """Run only a relay; any number may share one PostgreSQL store."""
    from .server import run_relay

    if not no_migrate:
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
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
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
@click.option("--id", "ids", multiple=True, type=int, help="Event id (repeatable).")
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
    click.echo(f"re-queued {count} event{'s' if count != 1 else ''}")


@main.command()
@click.option("--older-than", required=True, help="Age of delivered events to delete, e.g. 30d.")
@pass_context
def purge(ctx: Context, older_than: str) -> None:
    """Delete delivered events (and their attempts) older than a duration. Nothing else."""
    count = ctx.store.purge_delivered(now_ms() - parse_duration_ms(older_than))
    click.echo(f"purged {count} delivered event{'s' if count != 1 else ''}")


@main.command()
@click.option("--since", default="24h", show_default=True, help="Window: duration or ISO time.")
@pass_context
def stats(ctx: Context, since: str) -> None:
    """Counts by event type and delivery state over a window."""
    counts = ctx.store.count_by_type_and_status(parse_time_ms(since))
    states = ["pending", "delivered", "rejected", "dead"]
    table: dict[int, dict[str, int]] = {}
    for code, status, count in counts:
        table.setdefault(code, dict.fromkeys(states, 0))[status] = count
    click.echo(f"{'event type':28}" + "".join(f"{state:>11}" for state in states))
    for code, row in sorted(table.items()):
        name = catalog.BY_CODE[code].name if code in catalog.BY_CODE else "?"
        click.echo(f"{f'{code} {name}':28}" + "".join(f"{row[state]:>11}" for state in states))
    if not table:
        click.echo("(no events in this window)")
