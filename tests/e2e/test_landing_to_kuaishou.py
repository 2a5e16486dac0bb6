"""The product end to end: a real browser on an advertiser's site, `ks-collector serve`, Kuaishou.

The landing site and the collector listen on different ports, so every beacon crosses origins
as it does in production; the upstream is our mock Kuaishou on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Page

from tests.support.mock_kuaishou import MockKuaishou
from tests.support.processes import CollectorServer

# A click id with the characters that break naive decoding: '+', '/', '=' and a literal '%'.
CLICK_ID = "CLK.v1+aB/9x==%2F"

HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<script>window.kstag = window.kstag || function () {{ (kstag.q = kstag.q || []).push(arguments); }};
</script><script async src="{collector}/tag.js"></script></head><body>{body}</body></html>"""

PAGES = {
    "/landing": ("Spring course", '<a id="next" href="/signup">Sign up</a>'),
    "/signup": (
        "Sign up",
        """<form id="signup" method="post" action="/thanks">
        <input name="phone" id="phone" required><button id="send">Send</button></form>""",
    ),
    "/thanks": ("Thanks", '<p>Add us on WeChat: <span id="wx" data-ks-wechat>ks_teacher_01</span>'),
}


class LandingSite:
    """An advertiser's site on its own origin, with the tag pasted into every page."""

    def __init__(self, collector_url: str):
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.respond(self)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                site.respond(self)

            def log_message(self, *_: object) -> None:
                pass

        self.collector_url = collector_url
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.form_posts = 0
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        if handler.command == "POST":
            self.form_posts += 1
        if path not in PAGES:
            handler.send_error(404)
            return
        title, body = PAGES[path]
        page = HEAD.format(title=title, collector=self.collector_url, body=body).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(page)))
        handler.end_headers()
        handler.wfile.write(page)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector(mock_kuaishou: MockKuaishou, sqlite_url: str, tmp_path) -> Iterator[CollectorServer]:
    with CollectorServer(
        database_url=sqlite_url, upstream_url=mock_kuaishou.url, log_dir=tmp_path
    ) as server:
        yield server


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    yield context.new_page()
    context.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_form_and_wechat_copy_on_later_pages_reach_kuaishou_once_each(
    collector: CollectorServer, mock_kuaishou: MockKuaishou, page: Page
) -> None:
    site = LandingSite(collector.url)
    try:
        page.goto(f"{site.url}/landing?callback={quote(CLICK_ID, safe='')}")
        page.wait_for_load_state("networkidle")
        page.click("#next")
        page.wait_for_url(f"{site.url}/signup")
        assert "callback" not in page.url

        page.fill("#phone", "13800000000")
        submitted_at = now_ms()
        page.click("#send")
        page.wait_for_url(f"{site.url}/thanks")
        assert site.form_posts == 1, "the tag must never re-submit or block the form"

        page.evaluate("""() => {
            const range = document.createRange();
            range.selectNodeContents(document.getElementById('wx'));
            const selection = window.getSelection();
            selection.removeAllRanges();
            selection.addRange(range);
        }""")
        copied_at = now_ms()
        page.keyboard.press("Control+C")

        calls = mock_kuaishou.wait_for_requests(2, timeout=10)
        time.sleep(1.5)  # anything relayed twice would arrive within the relay's poll interval
        calls = mock_kuaishou.requests()
    finally:
        site.close()

    by_type = {}
    for call in calls:
        params = call["params"]
        by_type.setdefault(params["event_type"][0], []).append(params)
    assert sorted(by_type) == ["64", "9"], calls
    assert len(by_type["9"]) == 1 and len(by_type["64"]) == 1, calls
    for event_type, acted_at in (("9", submitted_at), ("64", copied_at)):
        params = by_type[event_type][0]
        assert params["callback"] == [CLICK_ID]
        event_time = params["event_time"][0]
        assert len(event_time) == 13 and event_time.isdigit()
        assert acted_at - 1000 <= int(event_time) <= acted_at + 5000


def test_demo_pages_show_the_flow_on_the_collector_itself(
    collector: CollectorServer, mock_kuaishou: MockKuaishou, page: Page
) -> None:
    page.goto(f"{collector.url}/demo?callback=TEST")
    page.wait_for_load_state("networkidle")
    page.click("#to-signup")
    page.fill("#name", "Li Lei")
    page.fill("#phone", "13800000000")
    page.click("button[type=submit]")
    page.wait_for_url(f"{collector.url}/demo/thanks")
    assert "ks_callback" in page.content() and "TEST" in page.content()

    [call] = mock_kuaishou.wait_for_requests(1, timeout=10)
    assert call["params"]["event_type"] == ["9"]
    assert call["params"]["callback"] == ["TEST"]
