"""How the tag finds the Kuaishou click id in the landing URL and keeps it across pages."""

from __future__ import annotations

import datetime

FORM = '<form action="/thanks" method="post"><button>Send</button></form>'

# Every storage method throws, as in some private modes and sandboxed iframes.
THROWING_LOCAL_STORAGE = """
for (const name of ['getItem', 'setItem', 'removeItem', 'key', 'clear']) {
  Storage.prototype[name] = () => { throw new DOMException('denied', 'SecurityError'); };
}
"""

# document.cookie throws on read and write, as in a sandboxed iframe.
THROWING_COOKIES = """
Object.defineProperty(Document.prototype, 'cookie', {
  get() { throw new DOMException('denied', 'SecurityError'); },
  set(value) { throw new DOMException('denied', 'SecurityError'); },
});
"""


def test_callback_in_query_is_captured_and_landing_sent(site, visit, collector, click_id):
    site.page("/")

    visit(f"/?utm_source=ks&callback={click_id}&plan=7")

    [event] = collector.expect(1)
    assert event == {
        "v": 1,
        "id": event["id"],
        "type": "landing",
        "callback": click_id,
        "age_ms": 0,
    }


def test_hash_route_callback_is_captured(site, visit, collector):
    site.page("/")

    visit("/#/offer?plan=7&callback=HASH-42")

    events = collector.expect(1)
    assert [(event["type"], event["callback"]) for event in events] == [("landing", "HASH-42")]


def test_plus_and_percent_encoded_plus_both_decode_to_plus(site, visit, collector):
    site.page("/")

    visit("/?callback=ab+cd")
    visit("/?callback=ef%2Bgh")

    assert [event["callback"] for event in collector.expect_distinct(2)] == ["ab+cd", "ef+gh"]


def test_percent25_is_decoded_once(site, visit, collector):
    site.page("/")

    visit("/?callback=a%2541b")

    assert [event["callback"] for event in collector.expect(1)] == ["a%41b"]


def test_malformed_percent_encoding_keeps_raw_value(site, visit, collector):
    site.page("/")

    visit("/?callback=ab%E0%A4cd")
    visit("/?callback=100%zz")

    assert [event["callback"] for event in collector.expect_distinct(2)] == ["ab%E0%A4cd", "100%zz"]


def test_macro_and_empty_callback_are_ignored(site, visit, collector):
    site.page("/", FORM)

    visit("/?callback=__CALLBACK__").click("button")
    visit("/?callback=&x=1").click("button")

    assert collector.expect(0) == []


def test_callback_survives_navigation_to_page_without_parameter(
    site, land, visit, collector, click_id
):
    site.page("/")
    site.page("/apply", FORM)
    land("/")

    visit("/apply").click("button")

    assert [(event["type"], event["callback"]) for event in collector.expect(1)] == [
        ("form", click_id)
    ]


def test_same_click_id_again_sends_no_second_landing(site, land, visit, collector):
    site.page("/")
    land("/", "SAME-1")

    visit("/?callback=SAME-1")

    assert collector.expect(0) == []


def test_new_click_id_replaces_stored_one(site, land, visit, collector):
    site.page("/")
    site.page("/apply", FORM)
    land("/", "OLD-1")

    visit("/?callback=NEW-2")
    visit("/apply").click("button")

    assert [(event["type"], event["callback"]) for event in collector.expect_distinct(2)] == [
        ("landing", "NEW-2"),
        ("form", "NEW-2"),
    ]


def test_callback_is_kept_for_seven_days_by_default(site, land, visit, context, collector):
    site.page("/")
    site.page("/apply", FORM)
    land("/")

    context.clock.set_system_time(datetime.datetime.now() + datetime.timedelta(days=6, hours=23))
    visit("/apply").click("button")

    assert [event["type"] for event in collector.expect(1)] == ["form"]


def test_expired_callback_is_not_used(site, land, visit, context, page, collector):
    site.page("/")
    site.page("/apply", FORM)
    land("/")

    context.clock.set_system_time(datetime.datetime.now() + datetime.timedelta(days=7, hours=1))
    visit("/apply").click("button")

    assert collector.expect(0) == []
    assert page.locator("input[name=ks_callback]").count() == 0


def test_ttl_days_option_sets_expiry(site, land, visit, context, collector):
    tag = f'<script async src="{site.tag_src}" data-ttl-days="1"></script>'
    site.page("/", tag=tag)
    site.page("/apply", FORM, tag=tag)
    land("/")

    context.clock.set_system_time(datetime.datetime.now() + datetime.timedelta(hours=25))
    visit("/apply").click("button")

    assert collector.expect(0) == []


def test_throwing_localstorage_falls_back_and_page_keeps_working(
    site, land, visit, context, collector, page_errors, click_id
):
    context.add_init_script(THROWING_LOCAL_STORAGE)
    site.page("/")
    site.page("/apply", FORM + "<script>document.title = 'page script ran'</script>")
    land("/")

    page = visit("/apply")
    page.click("button")

    assert [(event["type"], event["callback"]) for event in collector.expect(1)] == [
        ("form", click_id)
    ]
    assert page_errors == []


def test_without_any_storage_callback_still_serves_the_page_view(
    site, visit, context, collector, page_errors, click_id
):
    context.add_init_script(THROWING_LOCAL_STORAGE + THROWING_COOKIES)
    site.page("/", '<form onsubmit="event.preventDefault()"><button>Send</button></form>')

    page = visit(f"/?callback={click_id}")
    page.click("button")

    assert sorted(event["type"] for event in collector.expect(2)) == ["form", "landing"]
    assert page.input_value("input[name=ks_callback]") == click_id
    assert page_errors == []


def test_no_callback_sends_nothing(site, visit, collector):
    site.page(
        "/",
        '<form onsubmit="event.preventDefault()"><button>Send</button></form>'
        '<p data-ks-wechat>wx_123</p><a data-ks-track="51">pay</a>',
        head="<script>window.kstag = window.kstag || function () {"
        "(kstag.q = kstag.q || []).push(arguments) }; kstag('track', 'form');</script>",
    )

    page = visit("/")
    page.click("button")
    page.click("[data-ks-wechat]")
    page.click("[data-ks-track]")
    page.evaluate("kstag('track', 'form')")

    assert collector.expect(0) == []
    assert page.locator("input[name=ks_callback]").count() == 0
