"""Validation of one event: every refusal names the field and says what is wrong with it.

These call ``validate_api_event`` and ``validate_tag_event`` directly; the HTTP answers built
from them are covered in tests/test_api.py.
"""

from __future__ import annotations

import pytest

from collector import catalog
from collector.validation import (
    MAX_CALLBACK_BYTES,
    EventRefused,
    normalize_callback,
    now_ms,
    parse_amount,
    parse_finite,
    validate_api_event,
    validate_tag_event,
)

NOW = now_ms()
WEEK_MS = 7 * 86_400_000
DAY_MS = 86_400_000


def accept(**body):
    """Validate an API event (callback CLICK-1 unless given) and return the Conversion."""
    body.setdefault("callback", "CLICK-1")
    return validate_api_event(body, received_at_ms=NOW, max_age_ms=WEEK_MS)


def refuse(body: dict, max_age_ms: int = WEEK_MS) -> dict[str, list[str]]:
    """Validate an API event that must be refused; return its per-field errors."""
    with pytest.raises(EventRefused) as refused:
        validate_api_event(body, received_at_ms=NOW, max_age_ms=max_age_ms)
    return refused.value.errors


def event(event_type, **fields) -> dict:
    return {"event_type": event_type, "callback": "CLICK-1", **fields}


# ---- event type -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, "3", "payment", "Payment"])
def test_event_type_is_a_code_or_a_name(value):
    assert accept(event_type=value, purchase_amount=1).event_type == 3


@pytest.mark.parametrize("body", [{"callback": "CLICK-1"}, event(None)])
def test_event_type_is_required(body):
    assert refuse(body) == {"event_type": ["is required"]}


@pytest.mark.parametrize("value", [4, "buy", True, "landing"])
def test_unknown_event_type_is_refused_with_a_pointer_to_the_catalog(value):
    assert refuse(event(value)) == {
        "event_type": [
            "is not a Kuaishou event type; see GET /api/v1/event-types for codes and names"
        ]
    }


@pytest.mark.parametrize("value", [44.0, 9.5])
def test_a_fractional_event_type_is_refused_as_not_an_integer(value):
    assert refuse(event(value)) == {
        "event_type": [
            "must be an integer code (44, not 44.0) or a name; see GET /api/v1/event-types"
        ]
    }


def test_unknown_field_is_refused_by_name():
    assert refuse(event(9, amount=9.9)) == {"amount": ["is not a field this endpoint accepts"]}


def test_an_event_must_be_a_json_object():
    assert refuse(["form"]) == {"_schema": ["an event must be a JSON object"]}


def test_every_problem_of_an_event_is_reported_at_once():
    errors = refuse({"event_type": 3, "callback": "", "event_time": 1, "colour": "red"})
    assert errors == {
        "colour": ["is not a field this endpoint accepts"],
        "callback": ["must not be empty"],
        "event_time": ["must be a 13-digit Unix timestamp in milliseconds"],
        "purchase_amount": ["is required for event_type 3 (payment)"],
    }


# ---- purchase_amount ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted({3, 11, 12, 13, 14, 15}))
def test_purchase_amount_is_required_for_money_events(code):
    name = catalog.BY_CODE[code].name
    assert refuse(event(code)) == {
        "purchase_amount": [f"is required for event_type {code} ({name})"]
    }


@pytest.mark.parametrize(
    ("amount", "relayed"),
    [
        (9.9, "9.90"),
        ("9.9", "9.90"),
        (" 12.5 ", "12.50"),
        (10, "10.00"),
        ("10", "10.00"),
        (0, "0.00"),
        ("-0", "0.00"),
        (0.1, "0.10"),
        ("0.01", "0.01"),
        (100.0, "100.00"),
        ("100000000", "100000000.00"),
    ],
)
def test_purchase_amount_is_relayed_with_exactly_two_decimals(amount, relayed):
    assert accept(event_type=3, purchase_amount=amount).params == {"purchase_amount": relayed}


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (-1, "must not be negative"),
        ("-0.01", "must not be negative"),
        ("9.999", "has more than two decimals (the unit is yuan, not fen)"),
        (0.001, "has more than two decimals (the unit is yuan, not fen)"),
        ("NaN", "must be a finite number"),
        ("-Infinity", "must be a finite number"),
        ("inf", "must be a finite number"),
        ("100000000.01", "must be at most 100000000 yuan"),
        (1e20, "must be at most 100000000 yuan"),
        ("9.9元", 'must be a number, e.g. 9.9 or "9.90" (yuan)'),
        ("1e3", 'must be a number, e.g. 9.9 or "9.90" (yuan)'),
        ("1_000", 'must be a number, e.g. 9.9 or "9.90" (yuan)'),
        ("", 'must be a number, e.g. 9.9 or "9.90" (yuan)'),
        (True, 'must be a number, e.g. 9.9 or "9.90" (yuan)'),
        ([9.9], 'must be a number, e.g. 9.9 or "9.90" (yuan)'),
    ],
)
def test_bad_purchase_amount_is_refused_saying_why(amount, message):
    assert refuse(event(3, purchase_amount=amount)) == {"purchase_amount": [message]}


def test_purchase_amount_float_that_is_not_finite_is_refused():
    with pytest.raises(Exception, match="must be a finite number"):
        parse_amount(float("nan"))


def test_purchase_amount_is_refused_on_an_event_without_money():
    assert refuse(event(9, purchase_amount=9.9)) == {
        "purchase_amount": ["is not accepted with event_type 9 (form)"]
    }


def test_purchase_amount_is_optional_on_full_price_course_paid():
    assert accept(event_type=69).params == {}
    assert accept(event_type=69, purchase_amount="1999").params == {"purchase_amount": "1999.00"}


# ---- event-specific parameters -----------------------------------------------------------------


@pytest.mark.parametrize("code", [120, 121])
@pytest.mark.parametrize("reason", [1, 4, "5", 3.0])
def test_action_reason_1_to_5_is_relayed_on_120_and_121(code, reason):
    assert accept(event_type=code, action_reason=reason).params == {
        "action_reason": str(int(reason))
    }


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        (0, "must be between 1 and 5"),
        (6, "must be between 1 and 5"),
        ("-1", "must be between 1 and 5"),
        (4.5, "must be an integer"),
        ("four", "must be an integer"),
        (False, "must be an integer"),
    ],
)
def test_bad_action_reason_is_refused(reason, message):
    assert refuse(event(120, action_reason=reason)) == {"action_reason": [message]}


def test_action_reason_is_refused_on_other_events():
    assert refuse(event(119, action_reason=4)) == {
        "action_reason": ["is not accepted with event_type 119 (deal)"]
    }


@pytest.mark.parametrize("code", [150, 151])
@pytest.mark.parametrize(
    ("params", "relayed"),
    [
        ({}, {}),
        ({"novel_chapter_num": 1}, {"novel_chapter_num": "1"}),
        ({"novel_chapter_num": "1000"}, {"novel_chapter_num": "1000"}),
        ({"pay_level": "S"}, {"pay_level": "S"}),
        ({"pay_level": " L "}, {"pay_level": "L"}),
        (
            {"pay_level": "M", "purchase_amount": 6, "novel_chapter_num": 12},
            {"pay_level": "M", "purchase_amount": "6.00", "novel_chapter_num": "12"},
        ),
    ],
)
def test_novel_events_take_either_optional_parameter_and_require_none(code, params, relayed):
    assert accept(event_type=code, **params).params == relayed


@pytest.mark.parametrize("chapters", [0, 1001, -5])
def test_novel_chapter_num_outside_1_to_1000_is_refused(chapters):
    assert refuse(event(151, novel_chapter_num=chapters)) == {
        "novel_chapter_num": ["must be between 1 and 1000"]
    }


@pytest.mark.parametrize("level", ["s", "XL", 1, ""])
def test_pay_level_other_than_s_m_l_is_refused(level):
    assert refuse(event(150, pay_level=level)) == {"pay_level": ["must be one of S, M, L"]}


@pytest.mark.parametrize(("server_type", "relayed"), [(1, "1"), ("2", "2")])
def test_server_type_1_or_2_is_relayed_as_text(server_type, relayed):
    conversion = accept(event_type=182, server_type=server_type, connection_server="s-17")
    assert conversion.params == {"server_type": relayed, "connection_server": "s-17"}


def test_server_type_is_required_with_connection_server():
    assert refuse(event(182, connection_server="s-17")) == {
        "server_type": ["is required when connection_server is sent"]
    }


def test_server_type_alone_is_accepted():
    assert accept(event_type=182, server_type=2).params == {"server_type": "2"}


@pytest.mark.parametrize("server_type", [0, 3, "dedicated", 1.0])
def test_server_type_other_than_1_or_2_is_refused(server_type):
    assert refuse(event(182, server_type=server_type)) == {"server_type": ["must be one of 1, 2"]}


@pytest.mark.parametrize(("age", "relayed"), [(0, "0"), (150, "150"), ("35", "35")])
def test_user_tags_age_is_an_integer_from_0_to_150_on_any_event(age, relayed):
    assert accept(event_type=1, user_tags_age=age).params == {"user_tags_age": relayed}


@pytest.mark.parametrize(
    ("age", "message"),
    [
        (151, "must be between 0 and 150"),
        (-1, "must be between 0 and 150"),
        (30.5, "must be an integer"),
    ],
)
def test_bad_user_tags_age_is_refused(age, message):
    assert refuse(event(1, user_tags_age=age)) == {"user_tags_age": [message]}


@pytest.mark.parametrize(
    ("ltv", "ratio", "relayed"),
    [
        (123.45, 0.25, {"ext_pred_ltv": "123.45", "ext_pred_pay_ratio": "0.25"}),
        ("1e3", ".5", {"ext_pred_ltv": "1000", "ext_pred_pay_ratio": "0.5"}),
        (0, 1, {"ext_pred_ltv": "0", "ext_pred_pay_ratio": "1"}),
    ],
)
def test_predicted_values_are_relayed_in_canonical_form(ltv, ratio, relayed):
    assert accept(event_type=157, ext_pred_ltv=ltv, ext_pred_pay_ratio=ratio).params == relayed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ext_pred_ltv", "NaN", "must be a finite number"),
        ("ext_pred_ltv", "1e999", "must be a finite number"),
        ("ext_pred_ltv", -1, "must be between 0 and 1e+12"),
        ("ext_pred_ltv", "0x10", 'must be a number, e.g. 0.25 or "0.25"'),
        ("ext_pred_pay_ratio", 1.5, "must be between 0 and 1"),
        ("ext_pred_pay_ratio", "Infinity", "must be a finite number"),
        ("ext_pred_pay_ratio", "half", 'must be a number, e.g. 0.25 or "0.25"'),
    ],
)
def test_bad_predicted_values_are_refused(field, value, message):
    assert refuse(event(157, **{field: value})) == {field: [message]}


def test_parse_finite_refuses_a_float_infinity():
    with pytest.raises(Exception, match="must be a finite number"):
        parse_finite(float("inf"), 0, 1)


def test_key_action_parameters_are_relayed_with_143():
    conversion = accept(event_type=143, key_action_category="level", key_action_threshold="30")
    assert conversion.params == {"key_action_category": "level", "key_action_threshold": "30"}


def test_key_action_parameters_are_optional_on_143():
    assert accept(event_type=143).params == {}


def test_key_action_parameters_are_refused_on_other_events():
    assert refuse(event(182, key_action_category="level", key_action_threshold=30)) == {
        "key_action_category": ["is not accepted with event_type 182 (game_server_entered)"],
        "key_action_threshold": ["is not accepted with event_type 182 (game_server_entered)"],
    }


def test_a_null_optional_field_counts_as_absent():
    conversion = accept(event_type=120, action_reason=None, event_time=None, event_id=None)
    assert (conversion.params, conversion.event_time_ms, len(conversion.event_id)) == ({}, NOW, 32)


# ---- event_time --------------------------------------------------------------------------------


def test_event_time_in_milliseconds_is_kept():
    assert accept(event_type=9, event_time=NOW - 60_000).event_time_ms == NOW - 60_000
    assert accept(event_type=9, event_time=str(NOW - 1)).event_time_ms == NOW - 1


def test_absent_event_time_is_the_time_received():
    assert accept(event_type=9).event_time_ms == NOW


@pytest.mark.parametrize(
    ("event_time", "message"),
    [
        (
            NOW // 1000,
            "must be a 13-digit Unix timestamp in milliseconds; 10 digits looks like seconds",
        ),
        (
            NOW * 1000,
            "must be a 13-digit Unix timestamp in milliseconds; 16 digits looks like microseconds",
        ),
        (
            NOW * 1_000_000,
            "must be a 13-digit Unix timestamp in milliseconds; 19 digits looks like nanoseconds",
        ),
        (NOW // 10, "must be a 13-digit Unix timestamp in milliseconds"),
        (float(NOW), "must be a 13-digit Unix timestamp in milliseconds"),
        ("2024-05-01T10:00:00Z", "must be a 13-digit Unix timestamp in milliseconds"),
        (True, "must be a 13-digit Unix timestamp in milliseconds"),
    ],
)
def test_event_time_in_another_unit_is_refused_naming_the_unit(event_time, message):
    assert refuse(event(9, event_time=event_time)) == {"event_time": [message]}


def test_event_time_up_to_5_minutes_ahead_is_accepted():
    assert accept(event_type=9, event_time=NOW + 5 * 60_000).event_time_ms == NOW + 5 * 60_000


def test_event_time_more_than_5_minutes_ahead_is_refused():
    assert refuse(event(9, event_time=NOW + 5 * 60_000 + 1)) == {
        "event_time": ["is more than 5 minutes in the future; check the sender's clock"]
    }


def test_event_time_older_than_the_maximum_age_is_refused():
    assert accept(event_type=9, event_time=NOW - WEEK_MS).event_time_ms == NOW - WEEK_MS
    assert refuse(event(9, event_time=NOW - WEEK_MS - 1)) == {
        "event_time": [
            "is more than 7 days old (KS_COLLECTOR_MAX_EVENT_AGE_DAYS); "
            "a conversion this late is not relayed"
        ]
    }


def test_maximum_event_age_follows_the_setting():
    errors = refuse(event(9, event_time=NOW - 2 * DAY_MS), max_age_ms=DAY_MS)
    assert errors == {
        "event_time": [
            "is more than 1 days old (KS_COLLECTOR_MAX_EVENT_AGE_DAYS); "
            "a conversion this late is not relayed"
        ]
    }


# ---- callback ----------------------------------------------------------------------------------

ACTIVATE = "http://ad.partner.gifshow.com/track/activate"


@pytest.mark.parametrize(
    ("raw", "callback"),
    [
        ("  CLICK-1\n", "CLICK-1"),
        ("a+b/c=d%3D~é", "a+b/c=d%3D~é"),
        ("x" * MAX_CALLBACK_BYTES, "x" * MAX_CALLBACK_BYTES),
        (f"{ACTIVATE}?callback=INNER-1", "INNER-1"),
        ("https://ad.partner.gifshow.com/track/activate?callback=INNER-1&x=2", "INNER-1"),
        (f"{ACTIVATE}?callback=AB%2BC%3D%3D", "AB+C=="),
        ("http%3A%2F%2Fad.partner.gifshow.com%2Ftrack%2Factivate%3Fcallback%3DINNER-1", "INNER-1"),
        ("HTTPS%3A%2F%2Fad.partner.gifshow.com%2Ftrack%2Factivate%3Fcallback%3DAB%252BC", "AB+C"),
    ],
)
def test_callback_is_trimmed_unwrapped_from_an_activate_url_or_kept_byte_for_byte(raw, callback):
    assert normalize_callback(raw) == callback
    assert accept(event_type=9, callback=raw).callback == callback


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "must not be empty"),
        ("  \t", "must not be empty"),
        (
            "__CALLBACK__",
            "is the unreplaced macro __CALLBACK__: the landing URL was not filled in by Kuaishou",
        ),
        (
            f"{ACTIVATE}?callback=__CALLBACK__",
            "is the unreplaced macro __CALLBACK__: the landing URL was not filled in by Kuaishou",
        ),
        (f"{ACTIVATE}?callback=", "must not be empty"),
        ("x" * (MAX_CALLBACK_BYTES + 1), "is longer than 4096 bytes"),
        ("é" * (MAX_CALLBACK_BYTES // 2 + 1), "is longer than 4096 bytes"),
        ("CLICK\x00-1", "contains control characters"),
        (12345, "must be a string"),
    ],
)
def test_bad_callback_is_refused_saying_why(raw, message):
    assert refuse(event(9, callback=raw)) == {"callback": [message]}


def test_callback_or_lead_id_is_required():
    assert refuse({"event_type": 9}) == {"callback": ["is required (or send lead_id instead)"]}


def test_callback_and_lead_id_together_are_refused():
    assert refuse(event(9, lead_id="L-1")) == {"callback": ["send callback or lead_id, not both"]}


def test_lead_id_may_stand_in_for_the_callback():
    conversion = validate_api_event(
        {"event_type": "valid_lead", "lead_id": "L-1"}, received_at_ms=NOW, max_age_ms=WEEK_MS
    )
    assert (conversion.callback, conversion.lead_id, conversion.event_type) == (None, "L-1", 44)


# ---- event_id ----------------------------------------------------------------------------------


def test_event_id_is_kept_as_the_idempotency_key():
    assert accept(event_type=9, event_id="crm:order-42").event_id == "crm:order-42"


def test_events_without_an_event_id_get_a_fresh_one():
    first, second = accept(event_type=9), accept(event_type=9)
    assert len(first.event_id) == 32
    assert first.event_id != second.event_id


@pytest.mark.parametrize("event_id", ["", "order 42", "x" * 129, "订单42"])
def test_bad_event_id_is_refused(event_id):
    assert refuse(event(9, event_id=event_id)) == {
        "event_id": ["must be 1 to 128 letters, digits or . _ : -"]
    }


# ---- tag beacons -------------------------------------------------------------------------------


def beacon(**fields) -> dict:
    return {"v": 1, "id": "9f0c2a6e4b1d4c7e8a3f5b2d1e0c9a87", "callback": "CLICK-1", **fields}


@pytest.mark.parametrize(
    ("type_", "code"), [("form", 9), ("9", 9), ("wechat_copy", 64), (179, 179)]
)
def test_tag_may_report_browser_events(type_, code):
    tag_event = validate_tag_event(beacon(type=type_), received_at_ms=NOW)
    assert (tag_event.is_landing, tag_event.conversion.event_type) == (False, code)


@pytest.mark.parametrize("code", sorted(set(catalog.BY_CODE) - {9, 51, 64, 138, 179}))
def test_tag_may_not_report_server_only_events(code):
    name = catalog.BY_CODE[code].name
    with pytest.raises(EventRefused) as refused:
        validate_tag_event(beacon(type=name), received_at_ms=NOW)
    assert refused.value.errors == {
        "type": [
            f"{name} ({code}) cannot be reported from a browser; "
            "send it from your server through /api/v1/conversions"
        ]
    }


def test_tag_beacon_time_is_received_time_minus_its_age():
    tag_event = validate_tag_event(beacon(type="form", age_ms=30_000), received_at_ms=NOW)
    assert tag_event.conversion.event_time_ms == NOW - 30_000


def test_tag_beacon_carries_its_lead_id():
    tag_event = validate_tag_event(beacon(type="form", lead_id="L-1"), received_at_ms=NOW)
    assert (tag_event.conversion.lead_id, tag_event.conversion.source) == ("L-1", "tag")


def test_tag_landing_is_recognised():
    assert validate_tag_event(beacon(type="landing"), received_at_ms=NOW).is_landing


def test_tag_beacon_with_unknown_field_is_refused():
    with pytest.raises(EventRefused) as refused:
        validate_tag_event(beacon(type="form", amount=1), received_at_ms=NOW)
    assert refused.value.errors == {"amount": ["is not a field this endpoint accepts"]}
