"""The /admin dashboard in a real headless Chromium, against real collector processes.

Three weeks of history and today's events go through a real relay to the mock Kuaishou, which
refuses click ids starting with ``BAD`` with ``callbackinfo decodedfailure``. The relay is then
stopped, so an event replayed from the dashboard stays pending for the test to see. A screenshot
of the signed-in dashboard is saved to test-output/admin-dashboard.png.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from collector.store import open_store
from collector.validation import Conversion, now_ms
from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import RelayProcess, WebProcess, run_cli

ADMIN_TOKEN = "admin-token-0123456789abcdef"
API_TOKEN = "crm-token-0123456789abcdef"
SCREENSHOT = Path(__file__).resolve().parents[2] / "test-output" / "admin-dashboard.png"

# The dashboard counts days from midnight in the server's zone; pin it so "today" is known.
ZONE = dt.timezone(dt.timedelta(hours=8))
DAY_MS = 86_400_000

# Today's events sent through the API: four forms and two WeChat copies delivered, one refused.
TODAY = [("form", f"OK-FORM-{n}") for n in range(4)] + [
    ("wechat_copy", "OK-COPY-1"),
    ("wechat_copy", "OK-COPY-2"),
    ("form", "BAD-FORM-1-" + "x" * 40),
]


def history(store_url: str) -> int:
    """Twenty earlier days of events, never today's, for the charts to show a shape."""
    store = open_store(store_url)
    now = now_ms()
    conversions = []
    for day in range(1, 21):
        for n in range(10 + (day * 7) % 23):
            code = (9, 9, 64, 64, 3, 44, 179)[(day + n) % 7]
            refused = (day * 31 + n) % 17 == 0
            callback = f"{'BAD' if refused else 'OK'}-{day}-{n}-" + "x" * 30
            # Up to three hours before the same time `day` days ago: never today in any zone.
            at = now - day * DAY_MS - (n * 997_000) % 10_800_000
            params = {"purchase_amount": "9.90"} if code == 3 else {}
            conversions.append(Conversion(code, callback, at, at, "tag", params=params))
    store.add_conversions(conversions, frozenset())
    store.close()
    return len(conversions)


def post_event(web: WebProcess, event_type: str, callback: str) -> None:
    body = json.dumps({"event_type": event_type, "callback": callback}).encode()
    request = urllib.request.Request(
        web.url + "/api/v1/conversions",
        data=body,
        headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202


def wait_until_settled(store_url: str, count: int, timeout: float = 30) -> None:
    store = open_store(store_url)
    deadline = time.monotonic() + timeout
    try:
        while store.count_status("pending") or len(store.list_events(limit=count + 1)) < count:
            assert time.monotonic() < deadline, "the relay did not settle every event in time"
            time.sleep(0.1)
    finally:
        store.close()


@pytest.fixture
def dashboard(sqlite_url) -> Iterator[WebProcess]:
    """A collector with history and today's events settled, and no relay running any more."""
    mock = MockKuaishou()
    mock.start()
    mock.set_mode(callback_modes={"BAD": "decode_failure"})
    run_cli(["migrate"], database_url=sqlite_url)
    env = {
        "KS_COLLECTOR_ADMIN_TOKEN": ADMIN_TOKEN,
        "KS_COLLECTOR_API_TOKENS": f"crm:{API_TOKEN}",
        "TZ": "Asia/Shanghai",
    }
    web = WebProcess(env, workers=2, database_url=sqlite_url).start()
    total = history(sqlite_url)
    for event_type, callback in TODAY:
        post_event(web, event_type, callback)
    with RelayProcess(env, database_url=sqlite_url, upstream_url=mock.url):
        wait_until_settled(sqlite_url, total + len(TODAY))
    yield web
    web.terminate()
    mock.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, timezone_id="UTC")
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on(
        "console",
        lambda message: message.type == "error" and page.problems.append(message.text),
    )
    yield page
    context.close()


def sign_in(page: Page, web: WebProcess) -> None:
    page.goto(web.url + "/admin")
    assert page.url == web.url + "/admin/login?next=/admin"
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(web.url + "/admin")


def figures(page: Page, section: str) -> dict[str, str]:
    boxes = page.locator(f"#{section} .figure").all()
    return {box.locator("span").inner_text(): box.locator("b").inner_text() for box in boxes}


def test_sign_in_see_today_find_the_refusal_and_replay_it(dashboard, page):
    sign_in(page, dashboard)

    assert figures(page, "today-figures") == {
        "received": "7",
        "delivered": "6",
        "pending": "0",
        "rejected": "1",
        "dead": "0",
    }
    today_by_type = page.locator("#today-by-type tbody tr").all_inner_texts()
    assert [row.split("\t") for row in today_by_type] == [
        ["9 Form submitted", "4", "0", "1", "0"],
        ["64 WeChat ID copied", "2", "0", "0", "0"],
    ]

    reasons = page.locator("#reasons tbody tr").first
    assert reasons.locator("td").first.inner_text() == "callbackinfo decodedfailure"
    rejected_row = page.locator("#event-table tbody tr").filter(has_text="BAD-FORM")
    assert rejected_row.locator(".badge").inner_text() == "rejected"
    assert "callbackinfo decodedfailure" in rejected_row.locator("td.answer").inner_text()
    event_id = rejected_row.get_attribute("data-id")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    rejected_row.get_by_role("button", name="Replay").click()
    page.wait_for_load_state()

    assert page.get_by_role("status").inner_text().startswith("1 event put back in the queue")
    replayed = page.locator(f'#event-table tbody tr[data-id="{event_id}"]')
    assert replayed.locator(".badge").inner_text() == "pending"
    assert figures(page, "today-figures")["pending"] == "1"
    assert page.problems == []


def test_a_reason_leads_to_its_events_and_the_events_page(dashboard, page):
    sign_in(page, dashboard)

    page.locator("#reasons a").first.click()
    statuses = page.locator("#event-table .badge").all_inner_texts()
    assert statuses and set(statuses) == {"rejected"}

    page.locator("#event-table tbody tr td a").first.click()
    assert page.locator("h2").first.inner_text().endswith("rejected")
    assert page.locator("table tbody tr").count() == 1
    assert page.problems == []
