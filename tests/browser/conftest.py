"""Fixtures for the tag's browser tests.

Each test drives a real headless Chromium against two local servers on 127.0.0.1: the
advertiser's landing site, and a recording stand-in for the collector that serves ``/tag.js``
and records every ``/collect`` request. They listen on different ports, so every beacon is a
cross-origin request, as it is in production. Both are new for each test, on new ports, so a
beacon still in flight when a test ends cannot reach the next test's recorder.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page

# The tag under test, read afresh for every request so an edit needs no restart.
TAG_JS = Path(__file__).resolve().parents[2] / "static" / "tag.js"

# How long a test waits for a beacon it expects.
WAIT_SECONDS = 5.0
# How long a test watches for beacons it does not expect, once the expected ones are in.
QUIET_SECONDS = 0.3

# A click id as Kuaishou sends them: base64-ish, with a raw '+'.
CLICK_ID = "AbC+12/xyz=="


@dataclass
class Hit:
    """One request the stand-in collector received at /collect."""

    method: str
    path: str
    headers: dict[str, str]
    raw: str
    event: dict


class Recorder:
    """The stand-in collector: answers /collect with the statuses it is told, records the rest."""

    def __init__(self) -> None:
        self.url = ""
        self.hits: list[Hit] = []
        self.preflights = 0
        self.answers: deque[int] = deque()
        self.default_status = 202
        self._changed = threading.Condition()

    def answer(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, in order; then the default."""
        self.answers.extend(statuses)

    def next_status(self) -> int:
        with self._changed:
            return self.answers.popleft() if self.answers else self.default_status

    def record(self, hit: Hit) -> None:
        with self._changed:
            self.hits.append(hit)
            self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            self.hits.clear()

    def expect(self, count: int) -> list[dict]:
        """Wait for ``count`` events, then a quiet spell; return every event received."""
        self._wait_for(lambda: len(self.hits) >= count)
        time.sleep(QUIET_SECONDS)
        with self._changed:
            return [hit.event for hit in self.hits]

    def expect_distinct(self, count: int) -> list[dict]:
        """Like ``expect``, but one event per id, as the real collector keeps them.

        A page that navigates before a beacon's answer arrives cannot tell whether it was
        committed, so the next page load sends it again with the same id. Tests that navigate
        straight after an event see those re-sends; the collector deduplicates them.
        """
        self._wait_for(lambda: len(self._first_of_each_id()) >= count)
        time.sleep(QUIET_SECONDS)
        with self._changed:
            return self._first_of_each_id()

    def _first_of_each_id(self) -> list[dict]:
        by_id: dict[object, dict] = {}
        for hit in self.hits:
            by_id.setdefault(hit.event.get("id"), hit.event)
        return list(by_id.values())

    def _wait_for(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)

    def expect_hits(self, count: int) -> list[Hit]:
        self.expect(count)
        with self._changed:
            return list(self.hits)


class Site:
    """The advertiser's landing site: serves the pages a test sets and records form posts."""

    def __init__(self, tag_src: str) -> None:
        self.url = ""
        self.tag_src = tag_src
        self.pages: dict[str, str] = {}
        self.posts: list[tuple[str, dict[str, list[str]]]] = []

    def page(self, path: str, body: str = "", *, head: str = "", tag: str | None = None) -> None:
        """Serve a page at ``path``; ``tag`` replaces the default embed (``""`` for none)."""
        if tag is None:
            tag = f'<script async src="{self.tag_src}"></script>'
        self.pages[path] = (
            f'<!doctype html><html><head><meta charset="utf-8">{head}{tag}</head>'
            f"<body>{body}</body></html>"
        )

    def link(self, path: str) -> str:
        return self.url + path


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve on a free port of 127.0.0.1 for the duration; yield the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def serve_tag(self) -> None:
        self.reply(200, TAG_JS.read_bytes(), "application/javascript")


def _recorder_handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(_Quiet):
        def cors(self) -> dict[str, str]:
            return {"Access_Control_Allow_Origin": self.headers.get("Origin") or "*"}

        def do_OPTIONS(self) -> None:
            recorder.preflights += 1
            self.reply(204, b"", "text/plain", **self.cors())

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/tag.js":
                self.serve_tag()
                return
            raw = parse_qs(url.query).get("d", [""])[0]
            self.collect(url.path, raw)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.collect(urlsplit(self.path).path, self.rfile.read(length).decode("utf-8"))

        def collect(self, path: str, raw: str) -> None:
            status = recorder.next_status()
            answer = json.dumps({"status": "accepted" if status < 300 else "error"}).encode()
            self.reply(status, answer, "application/json", **self.cors())
            try:
                event = json.loads(raw)
            except ValueError:
                event = {}
            headers = {name.lower(): value for name, value in self.headers.items()}
            recorder.record(Hit(self.command, path, headers, raw, event))

    return Handler


def _site_handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(_Quiet):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/tag.js":
                self.serve_tag()
            elif path in site.pages:
                self.reply(200, site.pages[path].encode(), "text/html; charset=utf-8")
            else:
                self.reply(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            fields = parse_qs(self.rfile.read(length).decode("utf-8"), keep_blank_values=True)
            path = urlsplit(self.path).path
            site.posts.append((path, fields))
            page = site.pages.get(path, "<!doctype html><title>thanks</title><p>thanks</p>")
            self.reply(200, page.encode(), "text/html; charset=utf-8")

    return Handler


@pytest.fixture
def collector() -> Iterator[Recorder]:
    """The stand-in collector, answering 202 unless told otherwise."""
    recorder = Recorder()
    with _serving(_recorder_handler(recorder)) as recorder.url:
        yield recorder


@pytest.fixture
def site(collector: Recorder) -> Iterator[Site]:
    """The landing site, with no pages yet; pages embed the tag from the stand-in collector."""
    site = Site(collector.url + "/tag.js")
    with _serving(_site_handler(site)) as site.url:
        yield site


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh profile per test (empty storage and cookies) in the session's one Chromium."""
    context = browser.new_context()
    yield context
    context.close()


@pytest.fixture
def page_errors() -> list[str]:
    return []


@pytest.fixture
def page(context: BrowserContext, page_errors: list[str]) -> Page:
    page = context.new_page()
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    return page


@pytest.fixture
def visit(page: Page, site: Site) -> Callable[[str], Page]:
    """Open a path of the landing site and wait until the tag has run."""

    # Polled with evaluate: wait_for_function needs the page's own MutationObserver, which some
    # tests take away.
    def visit(path: str) -> Page:
        page.goto(site.link(path))
        deadline = time.monotonic() + WAIT_SECONDS
        while not page.evaluate("!!(window.kstag && window.kstag.loaded)"):
            assert time.monotonic() < deadline, f"the tag did not run on {path}"
            time.sleep(0.02)
        return page

    return visit


@pytest.fixture
def click_id() -> str:
    return CLICK_ID


@pytest.fixture
def land(visit: Callable[[str], Page], collector: Recorder) -> Callable[..., Page]:
    """Arrive from an ad click on ``path`` (default "/"), see the landing event, then forget it."""

    def land(path: str = "/", callback: str = CLICK_ID) -> Page:
        separator = "&" if "?" in path else "?"
        page = visit(f"{path}{separator}callback={callback}")
        events = collector.expect(1)
        assert [event["type"] for event in events] == ["landing"]
        collector.clear()
        return page

    return land
