"""The tag on pages that break what it relies on: it never throws into the page, keeps reporting.

Landing pages carry old libraries, their own bugs and odd markup. Whatever such a page does to
the globals or the DOM, the tag must not raise an error the page can see (``page_errors``), and
should still report what it can.
"""

from __future__ import annotations

import pytest

# A form that stays on the page, so a test can submit it and then look at the page.
FORM = '<form onsubmit="event.preventDefault()"><button id="send">Send</button></form>'

# What Prototype.js 1.6 does to arrays: they serialize themselves to JSON text, which
# JSON.stringify then quotes, so an array comes back from JSON.parse as a string.
PROTOTYPE_ARRAY_TO_JSON = """
Array.prototype.toJSON = function () {
  return '[' + this.map(function (value) { return JSON.stringify(value); }).join(', ') + ']';
};
"""


def types(events):
    return sorted(event["type"] for event in events)


# Queue replay


@pytest.mark.parametrize("queue", ["'abc'", "[5]"], ids=["string", "number-call"])
def test_malformed_kstag_queue_does_not_stop_form_reporting(
    site, visit, collector, page_errors, click_id, queue
):
    site.page("/", FORM, head=f"<script>window.kstag = {{q: {queue}}};</script>")

    page = visit(f"/?callback={click_id}")
    page.click("#send")

    assert types(collector.expect(2)) == ["form", "landing"]
    assert page_errors == []


def test_queued_call_that_throws_does_not_stop_later_calls_or_forms(
    site, visit, collector, page_errors, click_id
):
    site.page(
        "/",
        FORM,
        head="<script>window.kstag = function () { (kstag.q = kstag.q || []).push(arguments) };"
        "kstag('track', 'form', {get lead_id() { throw new Error('lead id is broken') }});"
        "kstag('track', 'wechat_copy', {lead_id: 'L-2'});</script>",
    )

    page = visit(f"/?callback={click_id}")
    page.click("#send")

    events = collector.expect(3)
    assert sorted((event["type"], event.get("lead_id")) for event in events) == [
        ("form", None),
        ("landing", None),
        ("wechat_copy", "L-2"),
    ]
    assert page_errors == []


def test_kstag_call_with_throwing_arguments_returns_normally(site, land, collector):
    site.page("/")
    page = land("/")

    returned = page.evaluate(
        "kstag('track', {toString() { throw new Error('type is broken') }}); 'returned'"
    )
    page.evaluate("kstag('track', 'form')")

    assert returned == "returned"
    assert types(collector.expect(1)) == ["form"]
