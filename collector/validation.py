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
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

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

_MACRO = re.compile(r"^__[A-Z0-9_]+__$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EVENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_DIGITS = re.compile(r"^[0-9]+$")


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
    lowered = value[:12].lower()
    if lowered.startswith(("http%3a%2f%2f", "https%3a%2f%2f")):
        value = unquote(value)
    elif not lowered.startswith(("http://", "https://")):
        return None
    query = parse_qs(urlsplit(value).query, keep_blank_values=True)
    values = query.get("callback")
    return values[0] if values else None


def parse_amount(raw: Any) -> str:
    """Yuan as a number or numeric string → the two-decimal text Kuaishou expects (9.9 → 9.90)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValidationError('must be a number of yuan, e.g. 9.9 or "9.90"')
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation:
        raise ValidationError('must be a number of yuan, e.g. 9.9 or "9.90"') from None
    if not amount.is_finite():
        raise ValidationError("must be a finite number")
    if amount < 0:
        raise ValidationError("must not be negative")
    if amount > MAX_AMOUNT_YUAN:
        raise ValidationError(f"must be at most {MAX_AMOUNT_YUAN} yuan")
    if amount != amount.quantize(Decimal("0.01")):
        raise ValidationError("has more than two decimals (the unit is yuan, not fen)")
    return f"{amount:.2f}"


def parse_integer(raw: Any, low: int, high: int) -> int:
    """An integer or a string of digits, within ``low``..``high``."""
    if isinstance(raw, bool):
        raise ValidationError("must be an integer")
    if isinstance(raw, str) and _DIGITS.match(raw.strip()) and len(raw.strip()) <= 12:
        raw = int(raw.strip())
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        raise ValidationError("must be an integer")
    if not low <= raw <= high:
        raise ValidationError(f"must be between {low} and {high}")
    return raw


def parse_finite(raw: Any, low: float | None = None, high: float | None = None) -> str:
    """A finite number (or numeric string) within bounds, as the text the relay sends."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValidationError("must be a number")
    try:
        number = float(raw)
    except (ValueError, OverflowError):
        raise ValidationError("must be a number") from None
    if not math.isfinite(number):
        raise ValidationError("must be a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValidationError(f"must be between {low} and {high}")
    return repr(number) if isinstance(raw, float) else str(raw).strip()


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
        raise ValidationError(f"is more than {days:g} days old; Kuaishou no longer attributes it")
    return event_time


def resolve_event_type(raw: Any) -> catalog.EventType:
    event_type = catalog.lookup(raw)
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
    if "connection_server" in params and "server_type" not in params:
        errors.setdefault("server_type", []).append("is required when connection_server is sent")
    if errors:
        raise ValidationError(errors)
    return params


# ---------------------------------------------------------------------------------------------
# Schemas


class _StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class TagEventSchema(_StrictSchema):
    """A beacon from static/tag.js (docs/tag-protocol.md)."""

    v = fields.Integer(strict=True, validate=validate.Equal(1))
    id = fields.String(required=True, validate=validate.Regexp(_EVENT_ID))
    type = fields.Raw(required=True)
    callback = fields.Raw(required=True)
    age_ms = fields.Integer(strict=True, load_default=0, validate=validate.Range(0, MAX_TAG_AGE_MS))
    lead_id = fields.String(validate=validate.Length(1, 128))


class ApiEventSchema(_StrictSchema):
    """One conversion from the advertiser's server: ``POST /api/v1/conversions``."""

    event_type = fields.Raw(
        required=True, metadata={"description": 'Kuaishou code (3) or catalog name ("payment")'}
    )
    callback = fields.Raw(
        metadata={"description": "the click id from the landing URL; or send lead_id instead"}
    )
    lead_id = fields.String(
        validate=validate.Length(1, 128),
        metadata={
            "description": "a lead id the tag reported with a form; resolved to its callback"
        },
    )
    event_time = fields.Raw(
        metadata={
            "description": "13-digit Unix milliseconds; default: when the collector received it"
        }
    )
    event_id = fields.String(
        validate=validate.Regexp(_EVENT_ID),
        metadata={"description": "idempotency key: an event_id seen before is answered duplicate"},
    )
    purchase_amount = fields.Raw(metadata={"description": "yuan, at most two decimals"})
    user_tags_age = fields.Raw()
    ext_pred_ltv = fields.Raw()
    ext_pred_pay_ratio = fields.Raw()
    pay_level = fields.Raw(metadata={"description": "S, M or L"})
    novel_chapter_num = fields.Raw()
    key_action_category = fields.Raw()
    key_action_threshold = fields.Raw()
    action_reason = fields.Raw()
    server_type = fields.Raw(metadata={"description": "1 dedicated, 2 mixed"})
    connection_server = fields.Raw()

    @validates_schema
    def _callback_or_lead(self, data: dict[str, Any], **_: Any) -> None:
        has_callback = data.get("callback") is not None
        if has_callback == ("lead_id" in data):
            raise ValidationError("send exactly one of callback or lead_id", "callback")


class ApiBatchSchema(_StrictSchema):
    events = fields.List(
        fields.Dict(), required=True, validate=validate.Length(1, MAX_BATCH_EVENTS)
    )


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


def validate_api_event(
    body: Any, *, received_at_ms: int, max_age_ms: int, source: str = "api"
) -> Conversion:
    """Validate one API event; raise ``EventRefused`` with per-field errors."""
    if not isinstance(body, dict):
        raise EventRefused({"_schema": ["an event must be a JSON object"]})
    errors: dict[str, list[str]] = {}
    try:
        data = ApiEventSchema().load(body)
    except ValidationError as error:
        errors.update(_field_errors(error))
        data = {key: value for key, value in body.items() if key not in errors}

    event_type = None
    if "event_type" in data:
        try:
            event_type = resolve_event_type(data["event_type"])
        except ValidationError as error:
            errors["event_type"] = error.messages
    callback = None
    if data.get("callback") is not None:
        try:
            callback = normalize_callback(data["callback"])
        except ValidationError as error:
            errors["callback"] = error.messages
    event_time = received_at_ms
    if data.get("event_time") is not None:
        try:
            event_time = parse_event_time(data["event_time"], received_at_ms, max_age_ms)
        except ValidationError as error:
            errors["event_time"] = error.messages
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
        data = TagEventSchema().load(body)
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
        event_id=data["id"],
        lead_id=data.get("lead_id"),
    )
    return TagEvent(conversion, is_landing)
