"""The /admin dashboard: who gets in, what the replay button may do, and what the page shows.

Most tests drive the Flask app in-process (the store is real SQLite); the test that needs several
gunicorn workers to agree on a session runs ``ks-collector web`` itself. The page as a person
sees it is tested in a real browser in tests/browser/test_admin_dashboard.py.
"""

from __future__ import annotations

import datetime as dt
import http.client
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from collector.config import Config
from collector.store import AttemptResult, Outcome, SqlStore, open_store
from collector.validation import Conversion, now_ms
from collector.web import admin, create_app
from tests.support.processes import WebProcess, run_cli

ADMIN_TOKEN = "admin-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DECODE_FAILURE = "callbackinfo decodedfailure"


# ---- helpers -----------------------------------------------------------------------------------


def add_event(
    store: SqlStore, callback: str, event_type: int = 9, received_at_ms: int | None = None
) -> int:
    at = now_ms() if received_at_ms is None else received_at_ms
    conversion = Conversion(event_type, callback, at, at, "api")
    [accepted] = store.add_conversions([conversion], frozenset())
    return accepted.id


def settle(store: SqlStore, outcomes: dict[int, str]) -> None:
    """Give the events these final states as a relay would: delivered, rejected or dead."""
    now = now_ms()
    due = store.claim_due("test-relay", 10_000, now + 1, 60_000)
    results = []
    for event in due:
        state = outcomes.get(event.id)
        if state == "delivered":
            results.append(
                AttemptResult(event, Outcome.DELIVERED, now, 5, 200, '{"result":1}', None)
            )
        elif state == "rejected":
            body = '{"result":0,"error_msg":"callbackinfo decodedfailure"}'
            results.append(
                AttemptResult(event, Outcome.REJECTED, now, 5, 200, body, DECODE_FAILURE)
            )
        elif state == "dead":
            results.append(
                AttemptResult(event, Outcome.TRANSIENT, now, 5, 503, "busy", "HTTP 503", dead=True)
            )
    store.record_attempts("test-relay", results)
    store.release_leases("test-relay")


class Admin:
    """An in-process collector app with the dashboard on, and the store behind it."""

    def __init__(self, database_url: str, **settings: str) -> None:
        self.store = open_store(database_url)
        self.store.migrate()
        settings.setdefault("admin_token", ADMIN_TOKEN)
        config = Config.from_env({}, database_url=database_url, **settings)
        self.app = create_app(config, self.store)
        self.client = self.app.test_client()

    def sign_in(self, token: str = ADMIN_TOKEN, next: str | None = None):
        form = {"token": token} | ({"next": next} if next else {})
        return self.client.post("/admin/login", data=form)

    def csrf(self) -> str:
        page = self.client.get("/admin").get_data(as_text=True)
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)

    def status(self, event_id: int) -> str:
        [row] = [row for row in self.store.list_events(limit=10_000) if row["id"] == event_id]
        return row["status"]


@pytest.fixture
def admin_app(sqlite_url) -> Iterator[Admin]:
    app = Admin(sqlite_url)
    yield app
    app.store.close()


# ---- turning it on and signing in -------------------------------------------------------------


def test_dashboard_is_404_without_an_admin_token(sqlite_url):
    app = Admin(sqlite_url, admin_token="")

    for path in ("/admin", "/admin/login", "/admin/events/1"):
        response = app.client.get(path)
        assert response.status_code == 404
        assert response.get_json()["error"] == "dashboard_off"
    assert app.client.post("/admin/login", data={"token": ""}).status_code == 404


def test_dashboard_sends_a_stranger_to_sign_in(admin_app):
    response = admin_app.client.get("/admin?status=dead")

    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/login?next=/admin?status%3Ddead"


def test_a_wrong_token_is_refused_and_sets_no_cookie(admin_app):
    response = admin_app.sign_in("admin-token-0123456789abcdeX")

    assert response.status_code == 401
    assert "That is not the admin token." in response.get_data(as_text=True)
    assert "Set-Cookie" not in response.headers
    assert admin_app.client.get("/admin").status_code == 302


def test_signing_in_sets_a_signed_httponly_strict_cookie_for_admin_only(admin_app):
    response = admin_app.sign_in()

    assert response.status_code == 302
    assert response.headers["Location"] == "/admin"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{admin.SESSION_COOKIE}=")
    attributes = {part.strip().split("=")[0] for part in cookie.split(";")[1:]}
    assert attributes == {"Expires", "Max-Age", "Path", "HttpOnly", "SameSite"}
    assert "Path=/admin" in cookie and "SameSite=Strict" in cookie
    assert ADMIN_TOKEN not in cookie
    assert admin_app.client.get("/admin").status_code == 200


def test_the_cookie_is_secure_when_the_proxy_says_the_browser_used_https(admin_app):
    response = admin_app.client.post(
        "/admin/login", data={"token": ADMIN_TOKEN}, headers={"X-Forwarded-Proto": "https"}
    )

    assert "; Secure" in response.headers["Set-Cookie"]


def test_a_tampered_cookie_is_refused(admin_app):
    admin_app.sign_in()
    cookie = admin_app.client.get_cookie(admin.SESSION_COOKIE, path="/admin")
    forged = cookie.value[:-2] + ("AA" if not cookie.value.endswith("AA") else "BB")
    admin_app.client.set_cookie(admin.SESSION_COOKIE, forged, path="/admin")

    assert admin_app.client.get("/admin").status_code == 302


def test_changing_the_admin_token_signs_everyone_out(sqlite_url):
    old = Admin(sqlite_url)
    old.sign_in()
    cookie = old.client.get_cookie(admin.SESSION_COOKIE, path="/admin").value
    new = Admin(sqlite_url, admin_token="another-admin-token-0123456789")
    new.client.set_cookie(admin.SESSION_COOKIE, cookie, path="/admin")

    assert new.client.get("/admin").status_code == 302


def test_an_expired_session_is_refused(admin_app, monkeypatch):
    admin_app.sign_in()
    monkeypatch.setattr(admin, "SESSION_MAX_AGE_SECONDS", -1)

    assert admin_app.client.get("/admin").status_code == 302


def test_the_bearer_token_opens_the_dashboard_without_a_cookie(admin_app):
    assert admin_app.client.get("/admin", headers=BEARER).status_code == 200
    wrong = {"Authorization": "Bearer admin-token-0123456789abcdeX"}
    response = admin_app.client.get("/admin", headers=wrong)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/admin", "//evil.example/admin", "/collect", "/\\evil.example"],
)
def test_signing_in_never_redirects_outside_the_dashboard(admin_app, target):
    response = admin_app.sign_in(next=target)

    assert response.headers["Location"] == "/admin"


def test_signing_in_returns_to_the_page_asked_for(admin_app):
    response = admin_app.sign_in(next="/admin?status=dead")

    assert response.headers["Location"] == "/admin?status=dead"


def test_signing_out_forgets_the_session(admin_app):
    admin_app.sign_in()
    response = admin_app.client.post("/admin/logout", data={"csrf": admin_app.csrf()})

    assert response.status_code == 302
    assert admin_app.client.get("/admin").status_code == 302


def test_the_page_runs_no_script_and_its_policy_allows_none(admin_app):
    response = admin_app.client.get("/admin", headers=BEARER)

    assert "<script" not in response.get_data(as_text=True)
    assert response.headers["Content-Security-Policy"] == admin.ADMIN_CSP
    assert "script-src" not in admin.ADMIN_CSP and "default-src 'none'" in admin.ADMIN_CSP
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"


# ---- replay ------------------------------------------------------------------------------------


def test_replay_puts_a_rejected_event_back_in_the_queue(admin_app):
    rejected = add_event(admin_app.store, "BAD-CLICK-1")
    settle(admin_app.store, {rejected: "rejected"})
    admin_app.sign_in()

    response = admin_app.client.post(
        "/admin/replay",
        data={"id": str(rejected), "csrf": admin_app.csrf(), "next": "/admin?status=rejected"},
    )

    assert response.status_code == 303
    assert response.headers["Location"] == "/admin?status=rejected&replayed=1"
    assert admin_app.status(rejected) == "pending"


def test_replay_without_the_csrf_field_is_refused(admin_app):
    rejected = add_event(admin_app.store, "BAD-CLICK-1")
    settle(admin_app.store, {rejected: "rejected"})
    admin_app.sign_in()

    response = admin_app.client.post("/admin/replay", data={"id": str(rejected)})

    assert response.status_code == 403
    assert response.get_json()["error"] == "csrf"
    assert admin_app.status(rejected) == "rejected"


def test_replay_with_another_sessions_csrf_value_is_refused(sqlite_url):
    first, second = Admin(sqlite_url), Admin(sqlite_url)
    rejected = add_event(first.store, "BAD-CLICK-1")
    settle(first.store, {rejected: "rejected"})
    first.sign_in()
    second.sign_in()

    response = first.client.post("/admin/replay", data={"id": str(rejected), "csrf": second.csrf()})

    assert response.status_code == 403
    assert first.status(rejected) == "rejected"


def test_replay_by_a_stranger_is_401(admin_app):
    rejected = add_event(admin_app.store, "BAD-CLICK-1")
    settle(admin_app.store, {rejected: "rejected"})

    response = admin_app.client.post("/admin/replay", data={"id": str(rejected)})

    assert response.status_code == 401
    assert admin_app.status(rejected) == "rejected"


def test_replay_with_the_bearer_token_needs_no_csrf_field(admin_app):
    dead = add_event(admin_app.store, "SLOW-CLICK-1")
    settle(admin_app.store, {dead: "dead"})

    response = admin_app.client.post("/admin/replay", data={"id": str(dead)}, headers=BEARER)

    assert response.status_code == 303
    assert admin_app.status(dead) == "pending"


def test_replay_leaves_delivered_and_pending_events_alone(admin_app):
    delivered = add_event(admin_app.store, "OK-CLICK-1")
    rejected = add_event(admin_app.store, "BAD-CLICK-1")
    settle(admin_app.store, {delivered: "delivered", rejected: "rejected"})
    pending = add_event(admin_app.store, "NEW-CLICK-1")

    response = admin_app.client.post(
        "/admin/replay",
        data={"id": [str(delivered), str(rejected), str(pending)]},
        headers=BEARER,
    )

    assert response.headers["Location"] == "/admin?replayed=1"
    assert [admin_app.status(i) for i in (delivered, rejected, pending)] == [
        "delivered",
        "pending",
        "pending",
    ]


@pytest.mark.parametrize("ids", [[], ["x"], [str(n) for n in range(1, 502)]])
def test_replay_refuses_missing_malformed_or_too_many_ids(admin_app, ids):
    response = admin_app.client.post("/admin/replay", data={"id": ids}, headers=BEARER)

    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_id"


# ---- what the page shows -----------------------------------------------------------------------


def cell_texts(html: str, table_id: str) -> list[list[str]]:
    """The text of each body row's cells of the table with this id."""
    table = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    rows = []
    for row in re.findall(r"<tr.*?</tr>", body, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        rows.append([re.sub(r"<[^>]+>|\s+", " ", cell).strip() for cell in cells])
    return rows


def test_top_rejection_reasons_are_counted_commonest_first(admin_app):
    ids = [add_event(admin_app.store, f"CLICK-{n}") for n in range(5)]
    settle(admin_app.store, {ids[0]: "rejected", ids[1]: "rejected", ids[2]: "dead"})

    html = admin_app.client.get("/admin", headers=BEARER).get_data(as_text=True)

    assert cell_texts(html, "reasons") == [
        [DECODE_FAILURE, "rejected", "2"],
        ["HTTP 503", "dead", "1"],
    ]


def test_a_reason_link_lists_only_the_events_that_failed_that_way(admin_app):
    ids = [add_event(admin_app.store, f"CLICK-{n}") for n in range(4)]
    settle(admin_app.store, {ids[0]: "rejected", ids[1]: "dead", ids[2]: "rejected"})
    query = f"/admin?status=rejected&reason={DECODE_FAILURE.replace(' ', '+')}"

    html = admin_app.client.get(query, headers=BEARER).get_data(as_text=True)

    rows = cell_texts(html, "event-table")
    assert [(row[0], row[4]) for row in rows] == [
        (str(ids[2]), "rejected"),
        (str(ids[0]), "rejected"),
    ]
    assert all(f"HTTP 200 · {DECODE_FAILURE}" == row[6] for row in rows)


def test_the_table_filters_by_status_and_event_type(admin_app):
    form = add_event(admin_app.store, "CLICK-1", event_type=9)
    copy = add_event(admin_app.store, "CLICK-2", event_type=64)
    add_event(admin_app.store, "CLICK-3", event_type=64)
    settle(admin_app.store, {form: "delivered", copy: "delivered"})

    html = admin_app.client.get("/admin?status=delivered&type=64", headers=BEARER).get_data(
        as_text=True
    )

    rows = cell_texts(html, "event-table")
    assert [(row[0], row[2], row[4], row[5]) for row in rows] == [
        (str(copy), "64 WeChat ID copied", "delivered", "1")
    ]


def test_the_table_pages_back_through_older_events(admin_app, monkeypatch):
    monkeypatch.setattr(admin, "PAGE_SIZE", 3)
    ids = [add_event(admin_app.store, f"CLICK-{n}") for n in range(5)]

    first = admin_app.client.get("/admin", headers=BEARER).get_data(as_text=True)
    older = re.search(r'href="([^"]+)">Older events', first).group(1).replace("&amp;", "&")
    second = admin_app.client.get(older, headers=BEARER).get_data(as_text=True)

    assert [int(row[0]) for row in cell_texts(first, "event-table")] == ids[:1:-1]
    assert [int(row[0]) for row in cell_texts(second, "event-table")] == ids[1::-1]
    assert "Older events" not in second


def test_todays_figures_count_events_by_state(admin_app):
    ids = [add_event(admin_app.store, f"CLICK-{n}") for n in range(6)]
    settle(admin_app.store, {ids[0]: "delivered", ids[1]: "delivered", ids[2]: "rejected"})
    add_event(admin_app.store, "OLD-CLICK", received_at_ms=now_ms() - 3 * 86_400_000)

    html = admin_app.client.get("/admin", headers=BEARER).get_data(as_text=True)

    today = html.split('id="today-figures"', 1)[1].split("</section>", 1)[0]
    figures = re.findall(r"<b>([^<]+)</b><span>([^<]+)</span>", today)
    assert [(label, value) for value, label in figures] == [
        ("received", "6"),
        ("delivered", "2"),
        ("pending", "3"),
        ("rejected", "1"),
        ("dead", "0"),
    ]


def test_the_window_shows_the_share_delivered(admin_app):
    ids = [add_event(admin_app.store, f"CLICK-{n}") for n in range(8)]
    settle(admin_app.store, {i: "delivered" for i in ids[:7]} | {ids[7]: "rejected"})

    html = admin_app.client.get("/admin", headers=BEARER).get_data(as_text=True)

    window = html.split('id="window-figures"', 1)[1]
    assert re.search(r"<b>87\.5%</b><span>delivered</span>", window)


def test_an_events_page_lists_every_attempt(admin_app):
    event = add_event(admin_app.store, "BAD-CLICK-1")
    settle(admin_app.store, {event: "rejected"})

    html = admin_app.client.get(f"/admin/events/{event}", headers=BEARER).get_data(as_text=True)

    assert f"Event {event}" in html
    assert html.count(DECODE_FAILURE) == 2  # the last answer, and the one attempt
    assert "<code>BAD-CLIC…</code>" in html and "BAD-CLICK-1" not in html
    assert f'name="id" value="{event}"' in html
    assert admin_app.client.get("/admin/events/999", headers=BEARER).status_code == 404


# ---- the charts' layout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peak", "step"), [(0, 1), (3, 1), (7, 2), (10, 5), (19, 5), (80, 20), (4321, 2000)]
)
def test_gridlines_fall_on_round_numbers(peak, step):
    assert admin.nice_step(peak) == step


def test_bars_stack_each_days_counts_in_series_order():
    days = [dt.date(2026, 1, 1), dt.date(2026, 1, 2)]
    chart = admin.stacked_bars(days, [("delivered", "green", [4, 0]), ("rejected", "red", [4, 2])])

    heights = [(bar.title, round(bar.height, 1)) for bar in chart.bars]
    unit = chart.plot_height / 8
    assert heights == [
        ("2026-01-01: delivered 4", round(4 * unit, 1)),
        ("2026-01-01: rejected 4", round(4 * unit, 1)),
        ("2026-01-02: rejected 2", round(2 * unit, 1)),
    ]
    first, second = chart.bars[:2]
    assert second.y + second.height == pytest.approx(first.y)
    assert chart.legend == [("delivered", "green", 4), ("rejected", "red", 6)]


def test_thirty_days_get_at_most_ten_date_labels_ending_today():
    days = [dt.date(2026, 1, 1) + dt.timedelta(days=n) for n in range(30)]

    labels = [text for _, text in admin.stacked_bars(days, []).dates]

    assert labels == ["01-03", "01-06", "01-09", "01-12", "01-15", "01-18", "01-21", "01-24",
                      "01-27", "01-30"]  # fmt: skip


# ---- several workers, one session --------------------------------------------------------------


def test_every_worker_accepts_a_session_signed_by_another(sqlite_url):
    run_cli(["migrate"], database_url=sqlite_url)
    env = {"KS_COLLECTOR_ADMIN_TOKEN": ADMIN_TOKEN, "KS_COLLECTOR_LOG_LEVEL": "DEBUG"}
    with WebProcess(env, workers=3, threads=1, database_url=sqlite_url) as web:
        port = urlsplit(web.url).port
        signed_in = request(port, "POST", "/admin/login", f"token={ADMIN_TOKEN}")
        cookie = signed_in.getheader("Set-Cookie").split(";", 1)[0]
        [signer] = re.findall(r"ks_collector\.admin\[(\d+)\]: signed in", web.log_text())

        # Six clients at once against three single-threaded workers, until another worker than
        # the one that signed the cookie has answered (the others may still be starting).
        answers: list[int] = []
        deadline = time.monotonic() + 30
        with ThreadPoolExecutor(6) as pool:
            while not set(viewers(web)) - {signer}:
                assert time.monotonic() < deadline, "no other worker answered"
                answers += pool.map(
                    lambda _: request(port, "GET", "/admin", cookie=cookie).status, range(12)
                )

    assert answers == [200] * len(answers)
    assert len(viewers(web)) == len(answers)


def viewers(web: WebProcess) -> list[str]:
    """The worker pid of every dashboard view so far, from the debug log."""
    return re.findall(r"ks_collector\.admin\[(\d+)\]: dashboard shown", web.log_text())


def request(port: int, method: str, path: str, body: str | None = None, cookie: str | None = None):
    """One request on a connection of its own, so gunicorn may hand it to any worker."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie:
        headers["Cookie"] = cookie
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response
