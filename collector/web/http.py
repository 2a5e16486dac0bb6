"""HTTP plumbing shared by the web layer: strict JSON bodies, JSON errors, client origins."""

from __future__ import annotations

import json
from typing import Any, NoReturn
from urllib.parse import urlsplit

from flask import Response, abort, jsonify, make_response, request

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


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(item, level + 1) for item in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(item, level + 1) for item in value), default=level)
    return level


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys, bounded nesting."""
    if not raw.strip():
        raise BadBody("the body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("the body is not valid UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except BadBody:
        raise
    except (ValueError, RecursionError) as error:
        raise BadBody(f"the body is not valid JSON: {str(error)[:120]}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadBody(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def read_body(limit: int) -> bytes:
    """The request body, refused with 413 when it is larger than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        error_response(413, "payload_too_large", f"the body is larger than {limit} bytes")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        error_response(413, "payload_too_large", f"the body is larger than {limit} bytes")
    return raw


def error_response(http_status: int, code: str, message: str, /, **extra: Any) -> NoReturn:
    """Abort with a JSON error body: ``{"error": code, "message": ..., ...}``."""
    response = make_response(jsonify(error=code, message=message, **extra), http_status)
    abort(response)


def json_response(http_status: int, /, **body: Any) -> Response:
    return make_response(jsonify(**body), http_status)


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Match ``https://shop.example.com`` against exact origins, ``*.example.com`` or ``*``."""
    if not allowed or "*" in allowed:
        return True
    parts = urlsplit(origin)
    if not parts.scheme or not parts.hostname:
        return False
    normalized = f"{parts.scheme}://{parts.netloc}".lower()
    for entry in allowed:
        entry = entry.lower().rstrip("/")
        if entry == normalized:
            return True
        if entry.startswith("*."):
            suffix = entry[1:]  # ".example.com"
            if parts.hostname.endswith(suffix) and len(parts.hostname) > len(suffix):
                return True
        elif "://*." in entry:
            scheme, _, pattern = entry.partition("://")
            suffix = pattern[1:]
            if parts.scheme == scheme and parts.netloc.endswith(suffix):
                return True
    return False


def page_origin() -> str | None:
    """The landing page's origin: the Origin header, else the Referer's scheme and host."""
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        return origin
    referer = request.headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}"
    return None
