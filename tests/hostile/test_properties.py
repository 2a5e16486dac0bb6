"""Property tests on everything that reads untrusted input: the schemas, the click id, the JSON.

Whatever arrives, validation either accepts it as something the store and the relay can use
as is, or refuses it with the exception it documents; it never fails in any other way.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from collector import catalog
from collector.validation import (
    MAX_CALLBACK_BYTES,
    Conversion,
    EventRefused,
    normalize_callback,
    validate_api_event,
    validate_tag_event,
)
from collector.web.http import MAX_JSON_DEPTH, BadBody, parse_json
from tests.hostile.figures import record_figures

NOW_MS = 1_750_000_000_000
WEEK_MS = 7 * 86_400_000

# Examples per property: enough to find the edge cases above, cheap enough for every CI run.
EXAMPLES = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Inputs tried per property, written to the figures file when the module ends.
TRIED: collections.Counter[str] = collections.Counter()

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EVENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@pytest.fixture(scope="module", autouse=True)
def _record_counts() -> Iterator[None]:
    yield
    record_figures("hypothesis", {"inputs": dict(TRIED), "total": sum(TRIED.values())})


# ---- strategies -------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**12, max_value=10**13)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.text(alphabet=string.digits + ".-+eE ", max_size=20)
    | st.sampled_from(["", " ", "NaN", "-inf", "1e999", "__CALLBACK__", "http://x/?callback=a"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)

event_types = st.sampled_from(
    [event.code for event in catalog.EVENT_TYPES]
    + [event.name for event in catalog.EVENT_TYPES]
    + [str(event.code) for event in catalog.EVENT_TYPES]
    + [catalog.LANDING, 0, 2, 4, 999, "payment ", " FORM", "９"]
)
# Click ids as Kuaishou writes them: base64-ish and percent-encoded text.
ordinary_callbacks = st.text(
    alphabet=string.ascii_letters + string.digits + "-_=+/%.~", min_size=1, max_size=600
)
callbacks = (
    ordinary_callbacks
    | st.text(max_size=80)
    | st.builds(
        lambda inner: "https://ad.partner.gifshow.com/track/activate?callback=" + inner,
        ordinary_callbacks,
    )
    | st.builds(lambda inner: "http%3A%2F%2Fx%2F%3Fcallback%3D" + inner, ordinary_callbacks)
    | st.just("c" * (MAX_CALLBACK_BYTES + 1))
    | json_values
)


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Values for one field: mostly plausible for it, often hostile."""
    plausible = {
        "v": st.just(1),
        "id": st.text(alphabet=string.hexdigits, min_size=1, max_size=130),
        "type": event_types,
        "event_type": event_types,
        "callback": callbacks,
        "age_ms": st.integers(min_value=-5, max_value=3 * 86_400_000),
        "lead_id": st.text(max_size=130),
        "event_time": st.integers(min_value=NOW_MS - 2 * WEEK_MS, max_value=NOW_MS + 10**6)
        | st.builds(str, st.integers(min_value=0, max_value=10**20)),
        "event_id": st.text(alphabet=string.ascii_letters + "._:-/", min_size=0, max_size=130),
        catalog.AMOUNT: st.decimals(allow_nan=True, allow_infinity=True).map(str)
        | st.floats(min_value=-1, max_value=2e8),
        "pay_level": st.sampled_from(["S", "M", "L", "s", "XL", 1]),
        "server_type": st.sampled_from([1, 2, "1", "2", 3, "dedicated"]),
        "action_reason": st.integers(min_value=-1, max_value=7),
        "novel_chapter_num": st.integers(min_value=-1, max_value=1002),
        "user_tags_age": st.integers(min_value=-1, max_value=200) | st.text(max_size=14),
    }.get(name, st.nothing())
    return plausible | json_values


def documents(names: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """JSON objects with any subset of ``names`` (plus, sometimes, unknown keys)."""
    fields = st.fixed_dictionaries({}, optional={name: field_values(name) for name in names})
    extra = st.dictionaries(st.text(max_size=12), json_values, max_size=2)
    with_extra = st.builds(lambda known, unknown: {**unknown, **known}, fields, extra)
    return fields | with_extra | json_values


TAG_FIELDS = ("v", "id", "type", "callback", "age_ms", "lead_id")
API_FIELDS = (
    "event_type",
    "callback",
    "lead_id",
    "event_time",
    "event_id",
    *catalog.KUAISHOU_PARAMETERS,
)


# ---- what an accepted event must look like ----------------------------------------------------


def assert_storable(conversion: Conversion) -> None:
    """What the store and the relay rely on, whoever sent the event."""
    if conversion.callback is not None:
        assert conversion.callback == conversion.callback.strip()
        assert 0 < len(conversion.callback.encode("utf-8")) <= MAX_CALLBACK_BYTES
        assert not _CONTROL.search(conversion.callback)
    assert _EVENT_ID.match(conversion.event_id)
    if conversion.lead_id is not None:
        assert 1 <= len(conversion.lead_id) <= 128
        conversion.lead_id.encode("utf-8")
    for name, value in conversion.params.items():
        assert name in catalog.KUAISHOU_PARAMETERS
        assert isinstance(value, str)
        assert 0 < len(value) <= 128
        assert not _CONTROL.search(value)


# ---- schemas ----------------------------------------------------------------------------------


@EXAMPLES
@given(documents(TAG_FIELDS))
def test_tag_beacons_are_accepted_storable_or_refused_with_reasons(body):
    TRIED["validate_tag_event"] += 1
    try:
        event = validate_tag_event(body, received_at_ms=NOW_MS)
    except EventRefused as refused:
        assert refused.errors and all(refused.errors.values())
        return

    conversion = event.conversion
    assert_storable(conversion)
    assert conversion.callback is not None
    assert conversion.source == "tag"
    assert NOW_MS - 2 * 86_400_000 <= conversion.event_time_ms <= NOW_MS
    if event.is_landing:
        assert conversion.event_type == 0
    else:
        assert catalog.BY_CODE[conversion.event_type].browser
        assert conversion.params == {}


@EXAMPLES
@given(documents(API_FIELDS))
def test_api_events_are_accepted_storable_or_refused_with_reasons(body):
    TRIED["validate_api_event"] += 1
    try:
        conversion = validate_api_event(body, received_at_ms=NOW_MS, max_age_ms=WEEK_MS)
    except EventRefused as refused:
        assert refused.errors and all(refused.errors.values())
        return

    assert_storable(conversion)
    event_type = catalog.BY_CODE[conversion.event_type]
    assert event_type.required <= set(conversion.params) <= event_type.allowed
    assert (conversion.callback is None) != (conversion.lead_id is None)
    assert NOW_MS - WEEK_MS <= conversion.event_time_ms <= NOW_MS + 5 * 60_000


# ---- the click id -----------------------------------------------------------------------------


@EXAMPLES
@given(callbacks)
def test_normalize_callback_returns_a_click_id_or_raises_validation_error(raw):
    TRIED["normalize_callback"] += 1
    try:
        callback = normalize_callback(raw)
    except ValidationError:
        return

    assert isinstance(callback, str)
    assert 0 < len(callback.encode("utf-8")) <= MAX_CALLBACK_BYTES


@EXAMPLES
@given(callbacks)
def test_normalize_callback_is_idempotent_on_its_own_output(raw):
    TRIED["normalize_callback idempotence"] += 1
    try:
        callback = normalize_callback(raw)
    except ValidationError:
        return

    assert normalize_callback(callback) == callback


@EXAMPLES
@given(ordinary_callbacks)
def test_normalize_callback_keeps_ordinary_click_ids_byte_for_byte(raw):
    assume(not re.match(r"^__[A-Z0-9_]+__$", raw))
    assume(not raw.lower().startswith(("http%3a%2f%2f", "https%3a%2f%2f")))
    TRIED["normalize_callback byte-preserving"] += 1

    assert normalize_callback(raw).encode("utf-8") == raw.encode("utf-8")


# ---- strict JSON ------------------------------------------------------------------------------


@EXAMPLES
@given(st.binary(max_size=200) | st.builds(lambda value: json.dumps(value).encode(), json_values))
def test_parse_json_returns_a_value_or_raises_bad_body(raw):
    TRIED["parse_json"] += 1
    try:
        value = parse_json(raw)
    except BadBody as error:
        assert str(error)
        return

    json.dumps(value, allow_nan=False).encode("utf-8")  # finite numbers, encodable strings


@EXAMPLES
@given(json_values)
def test_parse_json_reads_back_what_json_writes(value):
    try:
        raw = json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError:
        assume(False)  # NaN and infinities are not JSON, so json.dumps is not asked for them
    TRIED["parse_json round trip"] += 1

    try:
        parsed = parse_json(raw)
    except BadBody as error:
        # Only what no store can keep, and too deep a nesting, may be refused.
        assert str(error) in (
            f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep",
            "the JSON has a string with a NUL character",
        )
        return

    assert parsed == value
