"""``/collect``: beacons from static/tag.js on advertisers' landing pages (docs/tag-protocol.md).

Anyone on the internet can post here, so only browser-safe event types are taken, page origins
are checked against the allowlist, and nothing is answered 2xx before it is committed.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .. import metrics
from ..validation import TAG_EVENT_ID_PREFIX, EventRefused, now_ms, validate_tag_event
from .http import (
    BadBody,
    body_within,
    error_response,
    json_response,
    origin_allowed,
    page_origin,
    parse_json,
)

# A beacon is a few hundred bytes; the largest legitimate one (4 KB callback) fits easily.
MAX_BEACON_BYTES = 8 * 1024

blueprint = Blueprint("collect", __name__)


@blueprint.after_request
def allow_page_origin(response: Response) -> Response:
    """CORS for the tag's fetch: echo the page's origin when it is allowed."""
    origin = request.headers.get("Origin")
    if origin and origin_allowed(origin, current_app.config["KS"].allowed_origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        response.headers["Access-Control-Max-Age"] = "86400"
    response.headers["Vary"] = "Origin"
    return response


@blueprint.route("/collect", methods=["OPTIONS"])
def preflight() -> Response:
    return Response(status=204)


@blueprint.route("/collect", methods=["POST", "GET"])
def collect() -> Response:
    config = current_app.config["KS"]
    store = current_app.config["KS_STORE"]
    received_at = now_ms()

    origin = page_origin()
    if (
        config.allowed_origins
        and "*" not in config.allowed_origins
        and (origin is None or not origin_allowed(origin, config.allowed_origins))
    ):
        metrics.EVENTS_REFUSED.labels("tag", "origin").inc()
        error_response(
            403,
            "origin_not_allowed",
            f"page origin {origin or '(none sent)'} is not in KS_COLLECTOR_ALLOWED_ORIGINS",
        )

    rate_limits = current_app.extensions["ks_rate_limits"]
    rate_limits.check_client(request.remote_addr)

    raw = beacon_bytes()
    if raw is None and request.method == "GET":
        error_response(414, "uri_too_long", f"d is larger than {MAX_BEACON_BYTES} bytes")
    if raw is None:
        error_response(
            413, "payload_too_large", f"the body is larger than {MAX_BEACON_BYTES} bytes"
        )
    try:
        body = parse_json(raw)
        event = validate_tag_event(body, received_at_ms=received_at)
    except BadBody as error:
        metrics.EVENTS_REFUSED.labels("tag", "malformed").inc()
        error_response(400, "bad_body", str(error))
    except EventRefused as refused:
        metrics.EVENTS_REFUSED.labels("tag", "invalid").inc()
        error_response(422, "invalid_event", "the beacon was refused", fields=refused.errors)

    conversion = event.conversion
    rate_limits.check_click(conversion.callback)
    if event.is_landing:
        store.record_landing(conversion.callback, received_at)
        return json_response(202, status="recorded")
    if config.require_landing and not store.has_landing(conversion.callback):
        metrics.EVENTS_REFUSED.labels("tag", "no_landing").inc()
        error_response(
            422,
            "unknown_click",
            "this click id was never seen landing on a page with the tag",
            fields={"callback": ["was never reported by a landing beacon"]},
        )

    [accepted] = store.add_conversions([conversion], config.once_per_callback)
    counter = metrics.EVENTS_RECEIVED if accepted.status == "accepted" else metrics.EVENTS_DUPLICATE
    counter.labels("tag", str(conversion.event_type)).inc()
    # The beacon's id as the tag sent it, without the prefix that keeps it apart in the store.
    event_id = accepted.event_id.removeprefix(TAG_EVENT_ID_PREFIX)
    return json_response(202, status=accepted.status, id=accepted.id, event_id=event_id)


def beacon_bytes() -> bytes | None:
    """The beacon as sent, or None when it is larger than ``MAX_BEACON_BYTES``.

    A POST carries it as the body; the tag's last-resort transport, an image, carries it in the
    URL as ``?d=``.
    """
    if request.method == "GET":
        raw = request.args.get("d", "").encode("utf-8", "surrogatepass")
        return raw if len(raw) <= MAX_BEACON_BYTES else None
    return body_within(MAX_BEACON_BYTES)
