"""Validation of incoming events: the tag's beacons and the server API's conversions.

Both arrive as JSON and leave as ``Conversion`` objects that the store can commit as they are:
the event type resolved to its code, the callback normalised, ``event_time`` in milliseconds and
every Kuaishou parameter already in the text form the relay sends.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import unquote

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from . import catalog

# Kuaishou click ids seen in practice are a few hundred bytes; anything this long is not one.
MAX_CALLBACK_BYTES = 4096
# A batch larger than this is refused whole; clients split it.
MAX_BATCH_EVENTS = 500
# How far ahead of our clock a caller's event_time may be (their clock may run fast).
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
# A beacon re-sent from the tag's retry queue is at most this old (the tag keeps a day).
MAX_TAG_AGE_MS = 2 * 24 * 3600 * 1000
# Largest amount we believe is a real single conversion, in yuan.
MAX_AMOUNT_YUAN = Decimal("100000000")

_MACRO = re.compile(r"^__[A-Z0-9_]+__\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# These two are also OpenAPI patterns, so they end with an ECMAScript-compatible "(?!\n)$" where
# the others use "\Z": either way a trailing newline is not silently accepted.
_EVENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}(?!\n)$")
_EVENT_ID_RULE = "must be 1 to 128 letters, digits or . _ : -"
# Beacons' ids are kept under this prefix, apart from the API's: /collect is public, and a
# beacon reusing a CRM's event_id (an order number, say) must not make that conversion a
# duplicate. The API refuses ids with it.
TAG_EVENT_ID_PREFIX = "tag:"
# A lead id is the advertiser's own text; anything printable, never control characters.
_LEAD_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,128}(?!\n)$")
_LEAD_ID_RULE = "must be 1 to 128 characters without control characters"
_DIGITS = re.compile(r"^[0-9]+\Z")
_INTEGER = re.compile(r"^-?[0-9]{1,12}\Z")
# A plain decimal as people write amounts: no exponent, no digit separators, no hex.
_DECIMAL = re.compile(r"^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)\Z")
# A double as Kuaishou's predicted values may be written: a decimal, optionally with an exponent.
_FLOAT = re.compile(r"^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_NOT_FINITE = frozenset({"nan", "snan", "inf", "infinity"})


@dataclass
class Conversion:
    """One validated event, ready to commit to the outbox."""

    event_type: int
    callback: str | None
    event_time_ms: int
    received_at_ms: int
    source: str
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    params: dict[str, str] = field(default_factory=dict)
    lead_id: str | None = None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------
# Values


def normalize_callback(raw: Any) -> str:
    """Return the click id to relay, or raise ``ValidationError`` saying what is wrong with it.

    Kept byte for byte except for surrounding whitespace, and except when someone pasted a whole
    activate URL (or a once-encoded one): then the URL's own ``callback`` is the click id.
    """
    if not isinstance(raw, str):
        raise ValidationError("must be a string")
    callback = raw.strip()
    if not callback:
        raise ValidationError("must not be empty")
    if len(callback.encode("utf-8", "surrogatepass")) > MAX_CALLBACK_BYTES:
        raise ValidationError(f"is longer than {MAX_CALLBACK_BYTES} bytes")
    if _MACRO.match(callback):
        raise ValidationError(
            f"is the unreplaced macro {callback}: the landing URL was not filled in by Kuaishou"
        )
    inner = _callback_inside_url(callback)
    if inner is not None:
        return normalize_callback(inner)
    if _CONTROL.search(callback):
        raise ValidationError("contains control characters")
    return callback


def _callback_inside_url(value: str) -> str | None:
    lowered = value[:16].lower()
    if lowered.startswith(("http%3a%2f%2f", "https%3a%2f%2f")):
        value = unquote(value)
    elif not lowered.startswith(("http://", "https://")):
        return None
    # The query's or a hash route's callback, percent-decoded once with '+' kept as '+' (click
    # ids carry a raw '+'; parse_qs would turn it into a space).
    for part in re.split(r"[?&#]", value)[1:]:
        name, separator, raw = part.partition("=")
        if separator and name == "callback":
            return unquote(raw)
    return None


def _number_text(raw: Any, pattern: re.Pattern[str], example: str) -> str:
    """A JSON number or a numeric string as text, refused unless it is a finite number."""
    wrong = f"must be a number, e.g. {example}"
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValidationError(wrong)
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValidationError("must be a finite number")
    text = str(raw).strip()
    if isinstance(raw, str):
        if text.lower().lstrip("+-") in _NOT_FINITE:
            raise ValidationError("must be a finite number")
        if not pattern.match(text):
            raise ValidationError(wrong)
    return text


def parse_amount(raw: Any) -> str:
    """Yuan as a number or numeric string → the two-decimal text Kuaishou expects (9.9 → 9.90)."""
    amount = Decimal(_number_text(raw, _DECIMAL, '9.9 or "9.90" (yuan)'))
    if amount < 0:
        raise ValidationError("must not be negative")
    if amount > MAX_AMOUNT_YUAN:
        raise ValidationError(f"must be at most {MAX_AMOUNT_YUAN} yuan")
    if amount != amount.quantize(Decimal("0.01")):
        raise ValidationError("has more than two decimals (the unit is yuan, not fen)")
    # Adding zero turns -0 into 0, so "-0" is relayed as 0.00 rather than -0.00.
    return f"{amount + 0:.2f}"


def parse_integer(raw: Any, low: int, high: int) -> int:
    """An integer or a string of digits, within ``low``..``high``."""
    if isinstance(raw, bool):
        raise ValidationError("must be an integer")
    if isinstance(raw, str) and _INTEGER.match(raw.strip()):
        raw = int(raw.strip())
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        raise ValidationError("must be an integer")
    if not low <= raw <= high:
        raise ValidationError(f"must be between {low} and {high}")
    return raw


def parse_finite(raw: Any, low: float, high: float) -> str:
    """A finite number (or numeric string) within bounds, as the text the relay sends.

    The text is canonical whatever the caller wrote: ``"1e3"`` and ``1000.0`` leave as ``1000``,
    ``".25"`` as ``0.25``.
    """
    try:
        number = float(_number_text(raw, _FLOAT, '0.25 or "0.25"'))
    except OverflowError:
        raise ValidationError("must be a finite number") from None
    if not math.isfinite(number):  # a string such as "1e999"
        raise ValidationError("must be a finite number")
    if not low <= number <= high:
        raise ValidationError(f"must be between {low:g} and {high:g}")
    if number.is_integer():
        return str(int(number))
    return repr(number)


def parse_text(raw: Any, max_length: int) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValidationError("must be a non-empty string")
    text = raw.strip()
    if len(text) > max_length:
        raise ValidationError(f"must be at most {max_length} characters")
    if _CONTROL.search(text):
        raise ValidationError("contains control characters")
    return text


def _choice(*allowed: str):
    def parse_choice(raw: Any) -> str:
        text = str(raw).strip() if isinstance(raw, str | int) and not isinstance(raw, bool) else ""
        if text not in allowed:
            raise ValidationError(f"must be one of {', '.join(allowed)}")
        return text

    return parse_choice


# How each Kuaishou parameter is checked and turned into the text the relay sends.
PARAMETER_PARSERS = {
    catalog.AMOUNT: parse_amount,
    "user_tags_age": lambda raw: str(parse_integer(raw, 0, 150)),
    "ext_pred_ltv": lambda raw: parse_finite(raw, 0.0, 1e12),
    "ext_pred_pay_ratio": lambda raw: parse_finite(raw, 0.0, 1.0),
    "pay_level": _choice("S", "M", "L"),
    "novel_chapter_num": lambda raw: str(parse_integer(raw, 1, 1000)),
    "key_action_category": lambda raw: parse_text(raw, 64),
    "key_action_threshold": lambda raw: parse_finite(raw, 0.0, 1e12),
    "action_reason": lambda raw: str(parse_integer(raw, 1, 5)),
    "server_type": _choice("1", "2"),
    "connection_server": lambda raw: parse_text(raw, 128),
}
assert set(PARAMETER_PARSERS) == set(catalog.KUAISHOU_PARAMETERS)


def parse_event_time(raw: Any, received_at_ms: int, max_age_ms: int) -> int:
    """A caller's 13-digit millisecond timestamp, refused with the unit it seems to be in."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValidationError("must be a 13-digit Unix timestamp in milliseconds")
    text = str(raw).strip()
    if not _DIGITS.match(text):
        raise ValidationError("must be a 13-digit Unix timestamp in milliseconds")
    units = {10: "seconds", 16: "microseconds", 19: "nanoseconds"}
    if len(text) != 13:
        unit = units.get(len(text))
        hint = f"; {len(text)} digits looks like {unit}" if unit else ""
        raise ValidationError(f"must be a 13-digit Unix timestamp in milliseconds{hint}")
    event_time = int(text)
    if event_time > received_at_ms + MAX_FUTURE_SKEW_MS:
        raise ValidationError("is more than 5 minutes in the future; check the sender's clock")
    if event_time < received_at_ms - max_age_ms:
        days = max_age_ms / 86_400_000
        raise ValidationError(
            f"is more than {days:g} days old (KS_COLLECTOR_MAX_EVENT_AGE_DAYS); "
            "a conversion this late is not relayed"
        )
    return event_time


def resolve_event_type(raw: Any) -> catalog.EventType:
    event_type = catalog.lookup(raw)
    if event_type is None and isinstance(raw, float):
        # 44.0 names a real event type, but a code is an integer: say that, not "unknown".
        raise ValidationError(
            "must be an integer code (44, not 44.0) or a name; see GET /api/v1/event-types"
        )
    if event_type is None:
        raise ValidationError(
            "is not a Kuaishou event type; see GET /api/v1/event-types for codes and names"
        )
    return event_type


def check_parameters(event_type: catalog.EventType, data: dict[str, Any]) -> dict[str, str]:
    """Check the Kuaishou parameters present in ``data`` against ``event_type``'s rules."""
    errors: dict[str, list[str]] = {}
    params: dict[str, str] = {}
    label = f"event_type {event_type.code} ({event_type.name})"
    for name in catalog.KUAISHOU_PARAMETERS:
        if name not in data or data[name] is None:
            if name in event_type.required:
                errors[name] = [f"is required for {label}"]
            continue
        if name not in event_type.allowed:
            errors[name] = [f"is not accepted with {label}"]
            continue
        try:
            params[name] = PARAMETER_PARSERS[name](data[name])
        except ValidationError as error:
            errors[name] = error.messages if isinstance(error.messages, list) else [str(error)]
    sent = {name for name in catalog.KUAISHOU_PARAMETERS if data.get(name) is not None}
    if "connection_server" in sent and "server_type" not in sent:
        errors.setdefault("server_type", []).append("is required when connection_server is sent")
    if errors:
        raise ValidationError(errors)
    return params


# ---------------------------------------------------------------------------------------------
# Schemas


def _not_a_tag_event_id(value: str) -> None:
    if value.startswith(TAG_EVENT_ID_PREFIX):
        raise ValidationError(f"must not start with {TAG_EVENT_ID_PREFIX!r}: kept for tag beacons")


class _StrictSchema(Schema):
    """Fields not declared are refused by name rather than silently dropped."""

    error_messages: ClassVar[dict[str, str]] = {"unknown": "is not a field this endpoint accepts"}

    class Meta:
        unknown = RAISE


class TagEventSchema(_StrictSchema):
    """A beacon from static/tag.js (docs/tag-protocol.md)."""

    v = fields.Integer(strict=True, validate=validate.Equal(1))
    id = fields.String(required=True, validate=validate.Regexp(_EVENT_ID, error=_EVENT_ID_RULE))
    type = fields.Raw(required=True)
    callback = fields.Raw(required=True)
    age_ms = fields.Integer(strict=True, load_default=0, validate=validate.Range(0, MAX_TAG_AGE_MS))
    lead_id = fields.String(validate=validate.Regexp(_LEAD_ID, error=_LEAD_ID_RULE))


# OpenAPI shapes of the loosely typed fields below: numbers may also arrive as numeric strings.
_INTEGER_OR_TEXT = [{"type": "integer"}, {"type": "string"}]
_NUMBER_OR_TEXT = [{"type": "number"}, {"type": "string"}]


def _parameter(description: str, shape: dict[str, Any]) -> fields.Raw:
    """An optional field checked after loading (null counts as absent), described for OpenAPI."""
    return fields.Raw(allow_none=True, metadata={"description": description, **shape})


def _accepted_with(name: str) -> str:
    codes = [str(event.code) for event in catalog.EVENT_TYPES if name in event.allowed]
    if len(codes) == len(catalog.EVENT_TYPES):
        return "accepted with every event type"
    return "accepted with event type " + ", ".join(codes)


_AMOUNT_REQUIRED = ", ".join(
    str(event.code) for event in catalog.EVENT_TYPES if catalog.AMOUNT in event.required
)


class ApiEventSchema(_StrictSchema):
    """One conversion from the advertiser's server: ``POST /api/v1/conversions``.

    Send exactly one of ``callback`` and ``lead_id``. The Kuaishou parameters are declared
    loosely (numbers may be strings) and checked against the event type by ``check_parameters``.
    """

    event_type = fields.Raw(
        required=True,
        error_messages={"required": "is required", "null": "is required"},
        metadata={
            "description": 'Kuaishou code (3) or catalog name ("payment"); '
            "see GET /api/v1/event-types",
            "oneOf": [
                {"type": "integer", "enum": [event.code for event in catalog.EVENT_TYPES]},
                {
                    "type": "string",
                    "enum": [event.name for event in catalog.EVENT_TYPES]
                    + [str(event.code) for event in catalog.EVENT_TYPES],
                },
            ],
        },
    )
    callback = _parameter(
        "the click id Kuaishou put on the landing URL, complete and unmodified (a whole "
        "activate URL is unwrapped to its callback); or send lead_id instead",
        {"type": "string", "minLength": 1, "maxLength": MAX_CALLBACK_BYTES},
    )
    lead_id = fields.String(
        allow_none=True,
        validate=validate.Regexp(_LEAD_ID, error=_LEAD_ID_RULE),
        metadata={
            "description": "instead of callback: a lead id the tag reported with a form, "
            "resolved to that form's click id"
        },
    )
    event_time = _parameter(
        "13-digit Unix milliseconds, at most 5 minutes ahead and KS_COLLECTOR_MAX_EVENT_AGE_DAYS "
        "old; default: when the collector received the event",
        {"oneOf": _INTEGER_OR_TEXT},
    )
    event_id = fields.String(
        allow_none=True,
        validate=validate.And(
            validate.Regexp(_EVENT_ID, error=_EVENT_ID_RULE), _not_a_tag_event_id
        ),
        metadata={
            "description": "idempotency key: an event_id seen before is answered duplicate "
            "and not relayed again"
        },
    )
    purchase_amount = _parameter(
        f"yuan, at least 0, at most two decimals; relayed with two (9.9 → 9.90); required with "
        f"event type {_AMOUNT_REQUIRED}; {_accepted_with(catalog.AMOUNT)}",
        {"oneOf": _NUMBER_OR_TEXT},
    )
    user_tags_age = _parameter(
        f"user age 0–150 (insurance); {_accepted_with('user_tags_age')}",
        {"oneOf": _INTEGER_OR_TEXT},
    )
    ext_pred_ltv = _parameter(
        f"predicted LTV, a finite number ≥ 0; {_accepted_with('ext_pred_ltv')}",
        {"oneOf": _NUMBER_OR_TEXT},
    )
    ext_pred_pay_ratio = _parameter(
        f"predicted pay ratio, 0–1; {_accepted_with('ext_pred_pay_ratio')}",
        {"oneOf": _NUMBER_OR_TEXT},
    )
    pay_level = _parameter(
        f"payer tier: S small, M medium, L large; {_accepted_with('pay_level')}",
        {"type": "string", "enum": ["S", "M", "L"]},
    )
    novel_chapter_num = _parameter(
        f"novel chapters read, 1–1000; {_accepted_with('novel_chapter_num')}",
        {"oneOf": _INTEGER_OR_TEXT},
    )
    key_action_category = _parameter(
        f"the kind of game key action; {_accepted_with('key_action_category')}",
        {"type": "string", "maxLength": 64},
    )
    key_action_threshold = _parameter(
        f"the count, amount or level the key action reached, ≥ 0; "
        f"{_accepted_with('key_action_threshold')}",
        {"oneOf": _NUMBER_OR_TEXT},
    )
    action_reason = _parameter(
        f"reason code 1–5 (see the event type's note); {_accepted_with('action_reason')}",
        {"oneOf": _INTEGER_OR_TEXT},
    )
    server_type = _parameter(
        f"game server type: 1 dedicated, 2 mixed; required with connection_server; "
        f"{_accepted_with('server_type')}",
        {"oneOf": [{"type": "integer", "enum": [1, 2]}, {"type": "string", "enum": ["1", "2"]}]},
    )
    connection_server = _parameter(
        f"the game server entered; {_accepted_with('connection_server')}",
        {"type": "string", "maxLength": 128},
    )


class ApiBatchSchema(_StrictSchema):
    """``{"events": [...]}``: each item is then validated on its own by ``validate_api_event``."""

    events = fields.List(
        fields.Raw(allow_none=True),  # null is refused per event, like any other non-object
        required=True,
        error_messages={"required": "is required"},
        validate=validate.Length(
            1, MAX_BATCH_EVENTS, error="must hold 1 to {max} events; split larger batches"
        ),
    )


# One instance of each schema for the process: building one costs about 8 % of a beacon's CPU
# (measured by the benchmark's profile), and loading keeps no state on the instance.
_TAG_EVENT = TagEventSchema()
_API_EVENT = ApiEventSchema()
_API_BATCH = ApiBatchSchema()


def _field_errors(error: ValidationError) -> dict[str, list[str]]:
    messages = error.messages
    if isinstance(messages, dict):
        flattened: dict[str, list[str]] = {}
        for name, value in messages.items():
            if isinstance(value, dict):
                flattened[name] = [str(item) for item in value.values()]
            elif isinstance(value, list):
                flattened[name] = [str(item) for item in value]
            else:
                flattened[name] = [str(value)]
        return flattened
    return {"_schema": [str(item) for item in messages]}


class EventRefused(Exception):
    """An event failed validation; ``errors`` maps each field to what is wrong with it."""

    def __init__(self, errors: dict[str, list[str]]):
        super().__init__(errors)
        self.errors = errors


def batch_events(body: dict[str, Any]) -> list[Any]:
    """The items of a ``{"events": [...]}`` body; raise ``EventRefused`` if it is no batch."""
    try:
        return _API_BATCH.load(body)["events"]
    except ValidationError as error:
        raise EventRefused(_field_errors(error)) from None


def validate_api_event(
    body: Any, *, received_at_ms: int, max_age_ms: int, source: str = "api"
) -> Conversion:
    """Validate one API event; raise ``EventRefused`` with per-field errors."""
    if not isinstance(body, dict):
        raise EventRefused({"_schema": ["an event must be a JSON object"]})
    errors: dict[str, list[str]] = {}
    try:
        data = _API_EVENT.load(body)
    except ValidationError as error:
        errors.update(_field_errors(error))
        data = {key: value for key, value in body.items() if key not in errors}
    if body.get("callback") is None and body.get("lead_id") is None:
        errors.setdefault("callback", []).append("is required (or send lead_id instead)")
    elif body.get("callback") is not None and body.get("lead_id") is not None:
        errors.setdefault("callback", []).append("send callback or lead_id, not both")

    event_type = None
    if "event_type" in data:
        try:
            event_type = resolve_event_type(data["event_type"])
        except ValidationError as error:
            errors.setdefault("event_type", []).extend(error.messages)
    callback = None
    if data.get("callback") is not None:
        try:
            callback = normalize_callback(data["callback"])
        except ValidationError as error:
            errors.setdefault("callback", []).extend(error.messages)
    event_time = received_at_ms
    if data.get("event_time") is not None:
        try:
            event_time = parse_event_time(data["event_time"], received_at_ms, max_age_ms)
        except ValidationError as error:
            errors.setdefault("event_time", []).extend(error.messages)
    params: dict[str, str] = {}
    if event_type is not None:
        try:
            params = check_parameters(event_type, data)
        except ValidationError as error:
            errors.update(_field_errors(error))
    if errors or event_type is None:
        raise EventRefused(errors)

    conversion = Conversion(
        event_type=event_type.code,
        callback=callback,
        event_time_ms=event_time,
        received_at_ms=received_at_ms,
        source=source,
        params=params,
        lead_id=data.get("lead_id"),
    )
    if data.get("event_id"):
        conversion.event_id = data["event_id"]
    return conversion


@dataclass
class TagEvent:
    """A validated tag beacon: a conversion, or a landing (a click id was captured)."""

    conversion: Conversion
    is_landing: bool


def validate_tag_event(body: Any, *, received_at_ms: int) -> TagEvent:
    """Validate a beacon; raise ``EventRefused``. Browser-unsafe event types are refused."""
    if not isinstance(body, dict):
        raise EventRefused({"_schema": ["a beacon must be a JSON object"]})
    try:
        data = _TAG_EVENT.load(body)
    except ValidationError as error:
        raise EventRefused(_field_errors(error)) from None
    try:
        callback = normalize_callback(data["callback"])
    except ValidationError as error:
        raise EventRefused({"callback": error.messages}) from None

    is_landing = data["type"] == catalog.LANDING
    code = 0
    if not is_landing:
        event_type = catalog.lookup(data["type"])
        if event_type is None:
            raise EventRefused({"type": ["is not a Kuaishou event type"]})
        if not event_type.browser:
            raise EventRefused(
                {
                    "type": [
                        f"{event_type.name} ({event_type.code}) cannot be reported from a browser; "
                        "send it from your server through /api/v1/conversions"
                    ]
                }
            )
        code = event_type.code
    conversion = Conversion(
        event_type=code,
        callback=callback,
        event_time_ms=received_at_ms - data["age_ms"],
        received_at_ms=received_at_ms,
        source="tag",
        event_id=TAG_EVENT_ID_PREFIX + data["id"],
        lead_id=data.get("lead_id"),
    )
    return TagEvent(conversion, is_landing)
