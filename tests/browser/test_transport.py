"""How the tag sends events: the request itself, its fallbacks, and the retry queue."""

from __future__ import annotations

import datetime
import re

import pytest

EVENT_ID = re.compile(r"^[0-9a-f]{32}$")

NO_FETCH = "delete window.fetch;"
NO_BEACON = "delete Navigator.prototype.sendBeacon;"


def test_fetch_is_a_simple_cors_post_without_cookies_or_page_url(site, visit, context, collector):
    context.add_cookies([{"name": "session", "value": "secret", "url": collector.url}])
    site.page("/")

    visit("/?callback=CB-1")

    [hit] = collector.expect_hits(1)
    assert (hit.method, hit.path) == ("POST", "/collect")
    assert hit.headers["content-type"] == "text/plain;charset=UTF-8"
    assert hit.headers["origin"] == site.url
    assert "cookie" not in hit.headers
    # At most the origin, never the page's path or query.
    assert hit.headers.get("referer") in (None, site.url + "/")
    assert collector.preflights == 0


def test_events_carry_32_hex_ids_and_no_page_data(site, visit, collector):
    site.page(
        "/secret-path",
        '<p>Page text 张三</p><form onsubmit="event.preventDefault()">'
        '<input name="phone" value="13812345678"><button>Send</button></form>',
    )

    page = visit("/secret-path?callback=CB-2&name=zhangsan")
    page.click("button")
    page.evaluate("kstag('track', 'wechat_copy')")

    hits = collector.expect_hits(3)
    events = [hit.event for hit in hits]
    assert sorted(event["type"] for event in events) == ["form", "landing", "wechat_copy"]
    assert all(EVENT_ID.match(event["id"]) for event in events)
    assert len({event["id"] for event in events}) == 3
    assert all(set(event) == {"v", "id", "type", "callback", "age_ms"} for event in events)
    for hit in hits:
        for private in ("13812345678", "张三", "secret-path", "zhangsan", "phone"):
            assert private not in hit.raw


def test_ids_are_32_hex_without_crypto(site, visit, context, collector):
    context.add_init_script("delete Crypto.prototype.getRandomValues;")
    site.page("/")

    page = visit("/?callback=CB-3")
    page.evaluate("kstag('track', 'form')")

    events = collector.expect(2)
    assert all(EVENT_ID.match(event["id"]) for event in events)
    assert events[0]["id"] != events[1]["id"]


def test_endpoint_defaults_to_the_tag_script_origin(site, visit, collector):
    site.page("/")

    visit("/?callback=CB-4")

    assert [(hit.method, hit.path) for hit in collector.expect_hits(1)] == [("POST", "/collect")]


def test_endpoint_found_without_current_script(site, visit, context, collector):
    context.add_init_script(
        "Object.defineProperty(Document.prototype, 'currentScript', {get: () => null});"
    )
    site.page(
        "/", tag=f'<script async src="{site.tag_src}"></script><script src="/other.js"></script>'
    )

    visit("/?callback=CB-5")

    assert [event["callback"] for event in collector.expect(1)] == ["CB-5"]


def test_data_endpoint_overrides_script_origin(site, visit, collector):
    site.page("/", tag=f'<script async src="/tag.js" data-endpoint="{collector.url}/"></script>')

    visit("/?callback=CB-6")

    assert [(hit.path, hit.event["type"]) for hit in collector.expect_hits(1)] == [
        ("/collect", "landing")
    ]
    assert site.posts == []


def test_sendbeacon_is_used_without_fetch(site, visit, context, collector):
    context.add_init_script(NO_FETCH)
    site.page("/")

    visit("/?callback=CB-7")

    [hit] = collector.expect_hits(1)
    assert (hit.method, hit.path, hit.event["type"]) == ("POST", "/collect", "landing")
    assert hit.headers["content-type"] == "text/plain;charset=UTF-8"


def test_image_get_is_used_without_fetch_and_sendbeacon(site, visit, context, collector):
    context.add_init_script(NO_FETCH + NO_BEACON)
    site.page("/")

    visit("/?callback=CB+8%25")

    [hit] = collector.expect_hits(1)
    assert (hit.method, hit.path) == ("GET", "/collect")
    assert hit.event == {
        "v": 1,
        "id": hit.event["id"],
        "type": "landing",
        "callback": "CB+8%",
        "age_ms": 0,
    }
    # The origin alone: the collector's allowlist needs it, the page's URL stays private.
    assert hit.headers["referer"] == site.url + "/"


def test_blind_sent_event_is_resent_once_on_next_load(site, visit, context, collector):
    context.add_init_script(NO_FETCH)
    site.page("/")
    site.page("/next")
    visit("/?callback=CB-9")
    [first] = collector.expect(1)
    collector.clear()

    visit("/next")
    [again] = collector.expect(1)
    collector.clear()
    visit("/next")

    assert again["id"] == first["id"]
    assert again["age_ms"] > 0
    assert collector.expect(0) == []


def test_failed_beacon_is_queued_and_resent_on_next_load(site, visit, collector):
    site.page("/")
    site.page("/next")
    collector.answer(503)
    visit("/?callback=CB-10")
    [failed] = collector.expect(1)
    collector.clear()

    visit("/next")
    [resent] = collector.expect(1)
    collector.clear()
    visit("/next")

    assert (resent["id"], resent["type"], resent["callback"]) == (failed["id"], "landing", "CB-10")
    assert set(resent) == {"v", "id", "type", "callback", "age_ms"}
    assert failed["age_ms"] == 0
    assert resent["age_ms"] > 0
    assert collector.expect(0) == []


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_retryable_answers_keep_event_queued(site, visit, collector, status):
    site.page("/")
    site.page("/next")
    collector.answer(status)
    visit("/?callback=CB-11")
    [failed] = collector.expect(1)
    collector.clear()

    visit("/next")

    assert [event["id"] for event in collector.expect(1)] == [failed["id"]]


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_final_4xx_is_dropped_from_queue(site, visit, collector, status):
    site.page("/")
    site.page("/next")
    collector.answer(status)
    visit("/?callback=CB-12")
    assert len(collector.expect(1)) == 1
    collector.clear()

    visit("/next")

    assert collector.expect(0) == []


def test_event_is_given_up_after_five_sends(site, visit, collector):
    site.page("/")
    site.page("/next")
    collector.default_status = 503
    visit("/?callback=CB-13")
    [first] = collector.expect(1)
    collector.clear()

    for _ in range(5):
        visit("/next")

    # Five sends in all: the first, then one re-send on each of the next four loads.
    assert [event["id"] for event in collector.expect(4)] == [first["id"]] * 4


def test_queue_keeps_the_newest_20_events(site, visit, collector):
    site.page("/")
    site.page("/next")
    collector.default_status = 503
    page = visit("/?callback=CB-14")
    page.evaluate("for (let i = 0; i < 25; i++) kstag('track', 'form', {lead_id: 'L' + i})")
    collector.expect(26)
    collector.clear()
    collector.default_status = 202

    visit("/next")

    resent = sorted(int(event["lead_id"][1:]) for event in collector.expect(20))
    assert resent == list(range(5, 25))


def test_queued_events_older_than_a_day_are_not_resent(site, visit, context, collector):
    site.page("/")
    site.page("/next")
    collector.answer(503)
    visit("/?callback=CB-15")
    collector.expect(1)
    collector.clear()

    context.clock.set_system_time(datetime.datetime.now() + datetime.timedelta(hours=25))
    visit("/next")

    assert collector.expect(0) == []


def test_queued_event_is_resent_when_browser_comes_online(site, visit, context, collector):
    site.page("/")
    page = visit("/?callback=CB-16")
    collector.expect(1)
    collector.clear()

    context.set_offline(True)
    with page.expect_event("requestfailed"):
        page.evaluate("kstag('track', 'form', {lead_id: 'offline'})")
    context.set_offline(False)

    events = collector.expect(1)
    assert [(event["type"], event.get("lead_id")) for event in events] == [("form", "offline")]
