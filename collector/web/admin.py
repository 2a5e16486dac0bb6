"""``/admin``: the dashboard for the people who run the collector.

It is off (404) unless ``KS_COLLECTOR_ADMIN_TOKEN`` is set. Signing in with that token sets a
signed ``ks_admin`` cookie (HttpOnly, SameSite=Strict, Secure behind TLS) whose key is derived
from the token, so every worker and machine accepts it and changing the token signs everyone
out. Scripts may send ``Authorization: Bearer <token>`` instead. The one state-changing form,
replay, also carries a per-session CSRF token.

Everything is rendered on the server: the charts are inline SVG, the page runs no script, and
its Content-Security-Policy allows none.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from itsdangerous import BadSignature, URLSafeTimedSerializer

from .. import catalog
from ..relay import short_callback
from ..store import MAX_INT64, SqlStore, Status
from ..validation import now_ms
from .http import error_response
from .pages import relay_heartbeat_problem

log = logging.getLogger("ks_collector.admin")

blueprint = Blueprint("admin", __name__, url_prefix="/admin")

# The session cookie: its name, and how long a sign-in lasts.
SESSION_COOKIE = "ks_admin"
SESSION_MAX_AGE_SECONDS = 12 * 3600
# Chart windows offered, in days, and the one shown first.
WINDOW_CHOICES = (7, 14, 30)
DEFAULT_WINDOW_DAYS = 14
# Events per page of the table, and the most ids one replay may carry.
PAGE_SIZE = 50
MAX_REPLAY_IDS = 500
# Pending this long means the relay is not keeping up (or cannot reach Kuaishou).
OLD_PENDING_MS = 3_600_000
# The page needs styles and same-origin forms, nothing else: no script, no remote content.
ADMIN_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

DAY_MS = 86_400_000
# Statuses in the order they are shown and stacked: delivered at the bottom of every bar.
STATES = ("delivered", "pending", "rejected", "dead")
STATE_COLORS = {
    "delivered": "#2f855a",
    "pending": "#a0aec0",
    "rejected": "#dd6b20",
    "dead": "#742a2a",
}
TYPE_COLORS = ("#3182ce", "#38a169", "#d69e2e", "#805ad5", "#e53e3e", "#718096")
# Event types drawn apart in the chart by type; the rest are summed as "other".
CHART_TYPES = 5


# ---- signing in ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminSession:
    """Who is asking: a browser with the session cookie, or a script with the bearer token."""

    csrf: str | None  # None for bearer requests: no cookie is involved, so no CSRF either


def _token() -> str:
    token = current_app.config["KS"].admin_token
    if not token:
        error_response(
            404, "dashboard_off", "the dashboard is off: set KS_COLLECTOR_ADMIN_TOKEN to turn it on"
        )
    return token


def _signer(token: str) -> URLSafeTimedSerializer:
    # HMAC of the token rather than the token itself: the cookie's key never equals a secret
    # someone types, and every worker derives the same one without shared state.
    key = hmac.new(token.encode("utf-8"), b"ks-collector admin session", hashlib.sha256)
    return URLSafeTimedSerializer(key.hexdigest(), salt="ks-admin")


def _same_token(presented: str, token: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8"))


def _current_session(token: str) -> AdminSession | None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and presented.strip():
        return AdminSession(None) if _same_token(presented.strip(), token) else None
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        data = _signer(token).loads(cookie, max_age=SESSION_MAX_AGE_SECONDS)
    except BadSignature:
        return None
    csrf = data.get("csrf") if isinstance(data, dict) else None
    return AdminSession(csrf) if isinstance(csrf, str) and csrf else None


def _safe_next(target: str | None) -> str:
    """Where to go after signing in or replaying: a path under /admin, nothing else."""
    if target:
        parts = urlsplit(target)
        local = not parts.scheme and not parts.netloc and "\\" not in target
        if local and parts.path.startswith("/admin"):
            return target
    return url_for("admin.dashboard")


@blueprint.before_request
def require_sign_in() -> Response | None:
    token = _token()
    if request.endpoint == "admin.login":
        return None
    g.admin = _current_session(token)
    if g.admin is not None:
        return None
    if request.method == "GET" and "Authorization" not in request.headers:
        return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
    error_response(401, "unauthorized", "sign in at /admin/login or send the admin bearer token")


@blueprint.after_request
def admin_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = ADMIN_CSP
    response.headers["Cache-Control"] = "no-store"
    return response


def _check_csrf() -> None:
    session: AdminSession = g.admin
    if session.csrf is None:
        return
    presented = request.form.get("csrf", "")
    if not presented or not _same_token(presented, session.csrf):
        error_response(403, "csrf", "the form is out of date: reload the page and try again")


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Response | str:
    token = _token()
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("admin_login.html", next=target, error=None)
    if not _same_token(request.form.get("token", ""), token):
        log.warning("admin sign-in refused: wrong token")
        page = render_template(
            "admin_login.html", next=target, error="That is not the admin token."
        )
        return make_response(page, 401)
    log.info("signed in")
    response = redirect(target)
    response.set_cookie(
        SESSION_COOKIE,
        _signer(token).dumps({"csrf": secrets.token_urlsafe(24)}),
        max_age=SESSION_MAX_AGE_SECONDS,
        path="/admin",
        httponly=True,
        samesite="Strict",
        # Behind the TLS proxy requests arrive as http; its header says what the browser used.
        secure=request.is_secure or request.headers.get("X-Forwarded-Proto") == "https",
    )
    return response


@blueprint.route("/logout", methods=["POST"])
def logout() -> Response:
    _check_csrf()
    response = redirect(url_for("admin.login"))
    response.delete_cookie(SESSION_COOKIE, path="/admin")
    return response


# ---- charts --------------------------------------------------------------------------------


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass
class Chart:
    """A stacked bar chart, laid out here and drawn as SVG by the template."""

    width: int = 640
    height: int = 220
    left: int = 44  # room for the y-axis labels
    bottom: int = 24  # room for the dates
    bars: list[Bar] = field(default_factory=list)
    grid: list[tuple[float, str]] = field(default_factory=list)
    dates: list[tuple[float, str]] = field(default_factory=list)
    legend: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def plot_height(self) -> int:
        return self.height - self.bottom - 8


def nice_step(peak: int, lines: int = 4) -> int:
    """A round gridline step (1, 2, 5, 10, 20, ...) giving about ``lines`` gridlines."""
    raw = max(1.0, peak / lines)
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * magnitude >= raw:
            return int(multiple * magnitude)
    return int(10 * magnitude)


def stacked_bars(days: list[dt.date], series: list[tuple[str, str, list[int]]]) -> Chart:
    """Lay out one bar per day, each stacked from ``series`` of (label, colour, per-day values)."""
    chart = Chart()
    totals = [sum(values[index] for _, _, values in series) for index in range(len(days))]
    step = nice_step(max(totals, default=0))
    top = max(step, math.ceil(max(totals, default=0) / step) * step)
    scale = chart.plot_height / top
    for value in range(0, top + 1, step):
        chart.grid.append((chart.plot_height - value * scale + 8, f"{value:,}"))

    slot = (chart.width - chart.left) / max(1, len(days))
    width = max(2.0, slot * 0.7)
    label_every = math.ceil(len(days) / 10)
    for index, day in enumerate(days):
        x = chart.left + index * slot + (slot - width) / 2
        base = chart.plot_height + 8
        for label, color, values in series:
            count = values[index]
            if count:
                height = count * scale
                base -= height
                title = f"{day.isoformat()}: {label} {count:,}"
                chart.bars.append(Bar(x, base, width, height, color, title))
        if (len(days) - 1 - index) % label_every == 0:
            chart.dates.append((x + width / 2, day.strftime("%m-%d")))
    chart.legend = [(label, color, sum(values)) for label, color, values in series]
    return chart


# ---- the dashboard -------------------------------------------------------------------------


def type_name(code: int) -> str:
    event = catalog.BY_CODE.get(code)
    return f"{code} {event.label}" if event else str(code)


def local_zone() -> tuple[int, str]:
    """This server's UTC offset in ms and its name (``UTC+08:00``): days start at local midnight.

    Set TZ (e.g. ``Asia/Shanghai``) in the service's environment to choose it.
    """
    offset = dt.datetime.now().astimezone().utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return minutes * 60_000, f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def format_age(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = max(0, ms) // 1000
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def last_answer(row: dict[str, Any]) -> str:
    """What Kuaishou (or the network) said last: the error if any, else the body."""
    parts = []
    if row["last_http_status"] is not None:
        parts.append(f"HTTP {row['last_http_status']}")
    detail = row["last_error"] or row["last_response"]
    if detail:
        parts.append(detail)
    return " · ".join(parts)


def _int_arg(name: str, default: int | None = None) -> int | None:
    try:
        value = int(request.args.get(name, ""))
    except ValueError:
        return default
    # Both engines keep ids and times in 64-bit integers; a larger number matches nothing.
    return value if 0 <= value <= MAX_INT64 else default


def _filters() -> dict[str, Any]:
    days = _int_arg("days", DEFAULT_WINDOW_DAYS)
    status = request.args.get("status") or None
    found = catalog.lookup(request.args.get("type", "")) if request.args.get("type") else None
    return {
        "days": days if days in WINDOW_CHOICES else DEFAULT_WINDOW_DAYS,
        "status": status if status in STATES else None,
        "type": found.code if found else None,
        "reason": request.args.get("reason"),
        "before": _int_arg("before"),
    }


def _link(filters: dict[str, Any], **changes: Any) -> str:
    merged = {**filters, **changes}
    query = {key: value for key, value in merged.items() if value is not None}
    if query.get("days") == DEFAULT_WINDOW_DAYS:
        del query["days"]
    return url_for("admin.dashboard") + ("?" + urlencode(query) if query else "")


def _summaries(store: SqlStore, days: int) -> dict[str, Any]:
    now = now_ms()
    offset_ms, zone = local_zone()
    today = (now + offset_ms) // DAY_MS
    first = today - days + 1
    rows = store.daily_counts(first * DAY_MS - offset_ms, offset_ms)
    dates = [dt.date(1970, 1, 1) + dt.timedelta(days=day) for day in range(first, today + 1)]

    by_state = {state: [0] * days for state in STATES}
    by_type: dict[int, list[int]] = {}
    today_by_type: dict[int, dict[str, int]] = {}
    for day, code, state, count in rows:
        index = day - first
        if not 0 <= index < days or state not in by_state:
            continue
        by_state[state][index] += count
        by_type.setdefault(code, [0] * days)[index] += count
        if day == today:
            today_by_type.setdefault(code, dict.fromkeys(STATES, 0))[state] += count

    ranked = sorted(by_type, key=lambda code: (-sum(by_type[code]), code))
    type_series = [
        (type_name(code), TYPE_COLORS[rank], by_type[code])
        for rank, code in enumerate(ranked[:CHART_TYPES])
    ]
    if len(ranked) > CHART_TYPES:
        other = [sum(by_type[code][i] for code in ranked[CHART_TYPES:]) for i in range(days)]
        type_series.append(("other", TYPE_COLORS[CHART_TYPES], other))

    window = {state: sum(values) for state, values in by_state.items()}
    received = sum(window.values())
    today_totals = {state: by_state[state][-1] for state in STATES}
    return {
        "zone": zone,
        "outcome_chart": stacked_bars(
            dates, [(state, STATE_COLORS[state], by_state[state]) for state in STATES]
        ),
        "type_chart": stacked_bars(dates, type_series),
        "window": window,
        "received": received,
        "delivered_share": window["delivered"] / received if received else None,
        "today": today_totals,
        "today_received": sum(today_totals.values()),
        "today_by_type": sorted(today_by_type.items()),
        "since_ms": first * DAY_MS - offset_ms,
    }


def _health(store: SqlStore) -> dict[str, Any]:
    now = now_ms()
    pending, oldest_ms = store.pending_summary(now)
    beats = store.relay_heartbeats()
    latest = beats[0][1] if beats else None
    return {
        "pending": pending,
        "oldest": format_age(oldest_ms),
        "pending_old": oldest_ms is not None and oldest_ms > OLD_PENDING_MS,
        "dead": store.count_status(Status.DEAD),
        "relay_problem": relay_heartbeat_problem(latest, now),
        "relay_age": format_age(now - latest) if latest else None,
        "relays_alive": sum(1 for _, beat in beats if relay_heartbeat_problem(beat, now) is None),
    }


@blueprint.route("/")
@blueprint.route("")
def dashboard() -> str:
    store: SqlStore = current_app.config["KS_STORE"]
    filters = _filters()
    summary = _summaries(store, filters["days"])
    events = store.list_events(
        status=filters["status"],
        event_type=filters["type"],
        reason=filters["reason"],
        before_id=filters["before"],
        limit=PAGE_SIZE + 1,
    )
    older = None
    if len(events) > PAGE_SIZE:
        events = events[:PAGE_SIZE]
        older = _link(filters, before=events[-1]["id"])
    replayable = [row["id"] for row in events if row["status"] in ("rejected", "dead")]
    log.debug("dashboard shown")
    return render_template(
        "admin_dashboard.html",
        filters=filters,
        link=lambda **changes: _link(filters, **changes),
        summary=summary,
        health=_health(store),
        reasons=store.rejection_reasons(summary["since_ms"]),
        events=events,
        older=older,
        replayable=replayable,
        replayed=_int_arg("replayed"),
        here=request.full_path.rstrip("?"),
        csrf=g.admin.csrf or "",
        event_types=catalog.EVENT_TYPES,
        states=STATES,
        window_choices=WINDOW_CHOICES,
        default_days=DEFAULT_WINDOW_DAYS,
        type_name=type_name,
        last_answer=last_answer,
        local_time=_local_time,
        short_callback=short_callback,
    )


@blueprint.route(f"/events/<int(max={MAX_INT64}):event_id>")
def event_detail(event_id: int) -> str:
    store: SqlStore = current_app.config["KS_STORE"]
    rows = store.list_events(before_id=event_id + 1, limit=1)
    if not rows or rows[0]["id"] != event_id:
        error_response(404, "not_found", f"there is no event {event_id}")
    return render_template(
        "admin_event.html",
        event=rows[0],
        attempts=store.attempts_of(event_id),
        csrf=g.admin.csrf or "",
        here=request.full_path.rstrip("?"),
        type_name=type_name,
        last_answer=last_answer,
        local_time=_local_time,
        short_callback=short_callback,
        zone=local_zone()[1],
    )


@blueprint.route("/replay", methods=["POST"])
def replay() -> Response:
    """Put dead or rejected events back in the queue (``store.requeue``); others are ignored."""
    _check_csrf()
    try:
        ids = sorted({int(value) for value in request.form.getlist("id")})
    except ValueError:
        error_response(400, "bad_id", "event ids are whole numbers")
    if any(not 0 < event_id <= MAX_INT64 for event_id in ids):
        error_response(400, "bad_id", "no event has such an id")
    if not ids or len(ids) > MAX_REPLAY_IDS:
        error_response(400, "bad_id", f"choose between 1 and {MAX_REPLAY_IDS} events")
    count = current_app.config["KS_STORE"].requeue(now_ms(), ids=ids)
    log.info("re-queued %d of %d events asked for (ids %s)", count, len(ids), _id_list(ids))
    target = urlsplit(_safe_next(request.form.get("next")))
    query = "&".join(
        part for part in target.query.split("&") if part and not part.startswith("replayed=")
    )
    query = f"{query}&replayed={count}" if query else f"replayed={count}"
    return redirect(f"{target.path}?{query}", code=303)


def _id_list(ids: list[int]) -> str:
    shown = ", ".join(str(event_id) for event_id in ids[:10])
    return shown + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _local_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).astimezone().strftime("%m-%d %H:%M:%S")
