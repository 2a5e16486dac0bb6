"""Which page actions the tag reports, and the hidden field it puts in forms."""

from __future__ import annotations

# Declares kstag before the tag loads, as the embed instructions say; calls queue in kstag.q.
KSTAG_STUB = (
    "<script>window.kstag = window.kstag || function () {"
    "(kstag.q = kstag.q || []).push(arguments) };</script>"
)

NAVIGATING_FORM = """
<form action="/thanks" method="post">
  <input name="phone" value="13800000000"><button>Send</button>
</form>"""

# Submits by script, as most landing pages do, reading the form data in its own handler.
AJAX_FORM = """
<form id="lead"><input name="phone" value="13800000000"><button>Send</button></form>
<script>
document.getElementById('lead').addEventListener('submit', function (event) {
  event.preventDefault();
  window.sentFields = Object.fromEntries(new FormData(event.target));
});
</script>"""

# The same form, put on the page by script after the tag has run.
LATER_AJAX_FORM = """
<div id="slot"></div>
<script>
function showForm() {
  document.getElementById('slot').innerHTML =
    '<form id="lead"><input name="phone" value="13800000000"><button>Send</button></form>';
  document.getElementById('lead').addEventListener('submit', function (event) {
    event.preventDefault();
    window.sentFields = Object.fromEntries(new FormData(event.target));
  });
}
</script>"""

WECHAT = '<p>Add us on WeChat: <span data-ks-wechat>wx_landing_01</span></p><p id="other">Hi</p>'


def types(events):
    return [event["type"] for event in events]


def select_and_copy(page, selector):
    page.evaluate(f"getSelection().selectAllChildren(document.querySelector('{selector}'))")
    page.keyboard.press("Control+C")


def test_form_submit_that_navigates_sends_one_form_event(site, land, collector, click_id):
    site.page("/", NAVIGATING_FORM)
    page = land("/")

    with page.expect_navigation():
        page.click("button")

    assert [(event["type"], event["callback"]) for event in collector.expect(1)] == [
        ("form", click_id)
    ]


def test_navigating_form_posts_callback_in_hidden_field(site, land, click_id):
    site.page("/", NAVIGATING_FORM)
    page = land("/")

    with page.expect_navigation():
        page.click("button")

    assert site.posts == [("/thanks", {"phone": ["13800000000"], "ks_callback": [click_id]})]


def test_ajax_form_with_prevent_default_counts(site, land, collector, click_id):
    site.page("/", AJAX_FORM)
    page = land("/")

    page.click("button")

    assert types(collector.expect(1)) == ["form"]
    assert page.evaluate("window.sentFields") == {"phone": "13800000000", "ks_callback": click_id}


def test_form_whose_handler_stops_propagation_counts(site, land, collector):
    site.page(
        "/",
        '<form onsubmit="event.stopPropagation(); event.preventDefault()">'
        "<button>Send</button></form>",
    )
    page = land("/")

    page.click("button")

    assert types(collector.expect(1)) == ["form"]


def test_each_submission_sends_its_own_form_event(site, land, collector):
    site.page("/", AJAX_FORM)
    page = land("/")

    page.click("button")
    page.click("button")

    events = collector.expect(2)
    assert types(events) == ["form", "form"]
    assert events[0]["id"] != events[1]["id"]


def test_invalid_form_sends_nothing(site, land, collector):
    site.page(
        "/",
        '<form action="/thanks" method="post"><input name="phone" required>'
        "<button>Send</button></form>",
    )
    page = land("/")

    page.click("button")

    assert collector.expect(0) == []
    assert site.posts == []


def test_hidden_field_filled_including_forms_added_later(site, land, click_id):
    site.page("/", '<form id="first"></form><form id="second"><input name="a"></form>')
    page = land("/")

    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<form id=\"later\"></form>')")
    page.wait_for_selector("#later input[name=ks_callback]", state="attached", timeout=5000)

    for form in ("#first", "#second", "#later"):
        fields = page.locator(f"{form} input[name=ks_callback]")
        assert fields.count() == 1
        assert fields.get_attribute("type") == "hidden"
        assert fields.input_value() == click_id


def test_existing_callback_field_is_updated_not_duplicated(site, land, click_id):
    site.page("/", '<form><input type="hidden" name="ks_callback" value="stale"></form>')
    page = land("/")

    fields = page.locator("input[name=ks_callback]")
    assert fields.count() == 1
    assert fields.input_value() == click_id


def test_hidden_field_filled_at_submit_without_mutation_observer(site, land, context, click_id):
    context.add_init_script("delete window.MutationObserver")
    site.page("/", LATER_AJAX_FORM)
    page = land("/")

    page.evaluate("showForm()")
    filled_before_submit = page.locator("input[name=ks_callback]").count()
    page.click("button")

    assert filled_before_submit == 0
    assert page.evaluate("window.sentFields") == {"phone": "13800000000", "ks_callback": click_id}


def test_field_name_option_renames_hidden_field(site, land, click_id):
    site.page(
        "/", "<form></form>", tag=f'<script src="{site.tag_src}" data-field-name="ks_cid"></script>'
    )
    page = land("/")

    assert page.locator("input[name=ks_callback]").count() == 0
    assert page.input_value("input[name=ks_cid]") == click_id


def test_copy_inside_wechat_element_sends_once_per_page_view(site, land, visit, collector):
    site.page("/", WECHAT)
    page = land("/")

    select_and_copy(page, "[data-ks-wechat]")
    select_and_copy(page, "[data-ks-wechat]")
    page.click("[data-ks-wechat]")
    first_view = types(collector.expect(1))
    visit("/")
    select_and_copy(page, "[data-ks-wechat]")

    assert first_view == ["wechat_copy"]
    assert types(collector.expect(2)) == ["wechat_copy", "wechat_copy"]


def test_copy_outside_wechat_element_sends_nothing(site, land, collector):
    site.page("/", WECHAT)
    page = land("/")

    select_and_copy(page, "#other")

    assert collector.expect(0) == []


def test_click_on_wechat_button_sends_wechat_copy(site, land, collector):
    site.page("/", '<button data-ks-wechat><span id="label">Copy WeChat ID</span></button>')
    page = land("/")

    page.click("#label")

    assert types(collector.expect(1)) == ["wechat_copy"]


def test_data_ks_track_click_sends_event(site, land, collector):
    site.page(
        "/",
        '<a href="#pay" data-ks-track="51"><b id="pay">Pay now</b></a>'
        '<button data-ks-track="wechat_qr_click">QR</button><p id="plain">text</p>',
    )
    page = land("/")

    page.click("#pay")
    page.click("text=QR")
    page.click("#plain")

    assert sorted(types(collector.expect(2))) == ["51", "wechat_qr_click"]


def test_data_ks_track_double_tap_sends_once_per_page_view(site, land, visit, collector):
    site.page(
        "/",
        '<button data-ks-track="wechat_qr_click">QR</button>'
        '<button data-ks-track="51" id="pay">Pay</button>',
    )
    page = land("/")

    page.dblclick("text=QR")
    page.click("#pay")
    page.click("#pay")
    first_view = collector.expect(2)
    collector.clear()
    visit("/").dblclick("text=QR")
    # A first-view beacon whose answer had not arrived before the page was left is sent again
    # from the queue, with its id: the collector would take it as the same event.
    first_ids = {event["id"] for event in first_view}
    second_view = [event for event in collector.expect_distinct(1) if event["id"] not in first_ids]

    assert sorted(types(first_view)) == ["51", "wechat_qr_click"]
    assert types(second_view) == ["wechat_qr_click"]


def test_queued_kstag_calls_replay_after_load_with_lead_id(site, visit, collector, click_id):
    site.page(
        "/",
        head=KSTAG_STUB + "<script>"
        "kstag('track', 'form', {lead_id: 'L-1', phone: '13800000000'});"
        "kstag('track', 'wechat_copy');"
        "</script>",
    )

    page = visit(f"/?callback={click_id}")
    page.evaluate("kstag('track', 'form', {lead_id: 'L-2'})")

    events = {(event["type"], event.get("lead_id")): event for event in collector.expect(4)}
    assert sorted(events, key=str) == sorted(
        [("landing", None), ("form", "L-1"), ("wechat_copy", None), ("form", "L-2")], key=str
    )
    assert set(events["form", "L-1"]) == {"v", "id", "type", "callback", "age_ms", "lead_id"}


def test_lead_id_is_sent_as_a_string_and_left_out_when_longer_than_128(site, land, collector):
    site.page("/")
    page = land("/")

    page.evaluate("kstag('track', 'form', {lead_id: 42})")
    page.evaluate("kstag('track', 'form', {lead_id: 'L'.repeat(128)})")
    page.evaluate("kstag('track', 'form', {lead_id: 'L'.repeat(129)})")

    lead_ids = sorted((event.get("lead_id") or "") for event in collector.expect(3))
    assert lead_ids == ["", "42", "L" * 128]


def test_second_tag_copy_does_not_double_events(site, visit, collector, click_id):
    embed = f'<script async src="{site.tag_src}"></script>'
    site.page("/", AJAX_FORM + '<p data-ks-wechat id="wx">wx_1</p>', tag=embed + embed)

    page = visit(f"/?callback={click_id}")
    landing = types(collector.expect(1))
    collector.clear()
    page.click("button")
    page.click("#wx")

    assert landing == ["landing"]
    assert sorted(types(collector.expect(2))) == ["form", "wechat_copy"]
    assert page.locator("input[name=ks_callback]").count() == 1
