"""HTTP plumbing shared by the web layer: strict JSON bodies, JSON errors, client origins."""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn
from urllib.parse import SplitResult, urlsplit

from flask import Response, abort, jsonify, make_response, request
from gunicorn.http.errors import NoMoreData, ParseException

# Nesting deeper than this is not an event; refusing it early keeps the parser cheap.
MAX_JSON_DEPTH = 8


class BadBody(ValueError):
    """The request body is not the JSON we accept; the message says why."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadBody(f"duplicate key {key!r} in JSON object")
        result[key] = value
    return result


def _no_constants(name: str) -> NoReturn:
    raise BadBody(f"{name} is not valid JSON")


def _no_infinity(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise BadBody(f"the number {text[:20]} is out of range")
    return number


def _check_values(value: Any, level: int = 1) -> None:
    """Refuse nesting beyond ``MAX_JSON_DEPTH`` and strings no database can store as text.

    ``json`` turns a lone ``\\ud800`` escape into a lone surrogate, which is not UTF-8, and
    ``\\u0000`` into a NUL, which PostgreSQL refuses in text; both are caught here, for every
    field at once, so that they are a 400 rather than a failed commit.
    """
    if level > MAX_JSON_DEPTH:
        raise BadBody(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_values(item, level + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, level + 1)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadBody("the JSON has a string with an unpaired surrogate escape") from None
    if "\x00" in text:
        raise BadBody("the JSON has a string with a NUL character")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity or numbers out of range, no duplicate keys,
    no unpaired surrogates or NUL characters, bounded nesting."""
    if not raw.strip():
        raise BadBody("the body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("the body is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
            parse_float=_no_infinity,
        )
    except BadBody:
        raise
    except (ValueError, RecursionError) as error:
        raise BadBody(f"the body is not valid JSON: {str(error)[:120]}") from None
    _check_values(value)
    return value


def read_body(limit: int) -> bytes:
    """The request body, refused with 413 when it is larger than ``limit`` bytes."""
    raw = body_within(limit)
    if raw is None:
        error_response(413, "payload_too_large", f"the body is larger than {limit} bytes")
    return raw


def body_within(limit: int) -> bytes | None:
    """The request body if it is at most ``limit`` bytes, else None (read no further)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    try:
        raw = request.stream.read(limit + 1)
    except (ParseException, NoMoreData) as error:
        # The server reads a chunked body as it goes: a malformed chunk, or a body cut off
        # before its last chunk, shows up here.
        error_response(400, "bad_body", f"the body could not be read: {type(error).__name__}")
    return raw if len(raw) <= limit else None


def error_response(http_status: int, code: str, message: str, /, **extra: Any) -> NoReturn:
    """Abort with a JSON error body: ``{"error": code, "message": ..., ...}``."""
    response = make_response(jsonify(error=code, message=message, **extra), http_status)
    if http_status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ks-collector"'
    abort(response)


def json_response(http_status: int, /, **body: Any) -> Response:
    return make_response(jsonify(**body), http_status)


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Match ``https://shop.example.com`` against exact origins, ``*.example.com`` or ``*``."""
    if not allowed or "*" in allowed:
        return True
    parts = _split_url(origin)
    if parts is None or not parts.scheme or not parts.hostname:
        return False
    normalized = f"{parts.scheme}://{parts.netloc}".lower()
    for entry in allowed:
        entry = entry.lower().rstrip("/")
        if entry == normalized:
            return True
        if entry.startswith("*."):
            if _under(parts.hostname, entry[1:]):
                return True
        elif "://*." in entry:
            # The host and the port separately: the netloc "evil.com:1.example.com" ends with
            # ".example.com" too (browsers never send it, forged headers may).
            scheme, _, pattern = entry.partition("://")
            suffix, _, port = pattern[1:].partition(":")
            try:
                origin_port = parts.port
            except ValueError:
                return False
            if (
                parts.scheme == scheme
                and _under(parts.hostname, suffix)
                and str(origin_port or "") == port
            ):
                return True
    return False


def _under(hostname: str, suffix: str) -> bool:
    """``shop.example.com`` is under ``.example.com``; ``example.com`` itself is not."""
    return hostname.endswith(suffix) and len(hostname) > len(suffix)


def page_origin() -> str | None:
    """The landing page's origin: the Origin header, else the Referer's scheme and host."""
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        return origin
    referer = request.headers.get("Referer")
    if referer:
        parts = _split_url(referer)
        if parts is not None and parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}"
    return None


def _split_url(text: str) -> SplitResult | None:
    """``urlsplit``, or None for what it refuses (``http://[::1`` raises ValueError)."""
    try:
        return urlsplit(text)
    except ValueError:
        return None
