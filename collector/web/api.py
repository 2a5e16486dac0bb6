"""``/api/v1``: conversions from the advertiser's own servers and CRM, behind bearer tokens.

A batch is all-or-nothing: every event is validated (and every ``lead_id`` resolved) before any
is written, and the accepted ones are committed in one transaction. A batch with one bad event
is answered 422 and nothing of it is stored; a store that fails half-way rolls the whole batch
back and is answered 503 (or 500). A duplicate is not an error: an event whose ``event_id`` is
already stored, or a once-per-click event type already stored for its callback, is answered
``duplicate`` (with the stored event's id) while the rest of the batch is committed.
"""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Response, current_app, g, jsonify, request

from .. import catalog, metrics
from ..validation import EventRefused, batch_events, now_ms, validate_api_event
from .http import BadBody, error_response, json_response, parse_json, read_body
from .openapi import openapi_document

# 500 events of a few hundred bytes each, with room to spare.
MAX_API_BODY_BYTES = 1024 * 1024

log = logging.getLogger("ks_collector.api")
blueprint = Blueprint("api", __name__, url_prefix="/api/v1")


def authenticated_token_name() -> str:
    """The name of the caller's token, or a 401 answer. Every token is compared in full."""
    tokens: dict[str, str] = current_app.config["KS"].api_tokens
    if not tokens:
        error_response(
            401, "api_disabled", "no API tokens are configured (KS_COLLECTOR_API_TOKENS)"
        )
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        error_response(401, "unauthorized", "send Authorization: Bearer <token>")
    presented_bytes = presented.strip().encode("utf-8", "surrogatepass")
    matched = None
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode("utf-8"), presented_bytes):
            matched = name
    if matched is None:
        error_response(401, "unauthorized", "the bearer token is not valid")
    return matched


@blueprint.route("/conversions", methods=["POST"])
def post_conversions() -> Response:
    """Commit one event object, or ``{"events": [...]}`` of up to 500."""
    g.token_name = authenticated_token_name()
    config = current_app.config["KS"]
    store = current_app.config["KS_STORE"]
    received_at = now_ms()

    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        metrics.EVENTS_REFUSED.labels("api", "malformed").inc()
        error_response(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {encoding} is not accepted: send the JSON uncompressed",
        )
    try:
        body = parse_json(read_body(MAX_API_BODY_BYTES))
    except BadBody as error:
        metrics.EVENTS_REFUSED.labels("api", "malformed").inc()
        error_response(400, "bad_body", str(error))
    if isinstance(body, list):
        metrics.EVENTS_REFUSED.labels("api", "invalid").inc()
        error_response(
            422,
            "invalid_batch",
            'send one event as a JSON object, or several as {"events": [...]}, not a bare array',
        )
    items = [body]
    if isinstance(body, dict) and "events" in body:
        try:
            items = batch_events(body)
        except EventRefused as refused:
            metrics.EVENTS_REFUSED.labels("api", "invalid").inc()
            error_response(422, "invalid_batch", "the batch was refused", fields=refused.errors)

    max_age_ms = int(config.max_event_age_days * 86_400_000)
    conversions, problems = [], []
    for index, item in enumerate(items):
        try:
            conversion = validate_api_event(item, received_at_ms=received_at, max_age_ms=max_age_ms)
        except EventRefused as refused:
            problems.append({"index": index, "errors": refused.errors})
        else:
            conversions.append((index, conversion))

    lead_ids = {c.lead_id for _, c in conversions if c.callback is None and c.lead_id}
    known = store.resolve_leads(lead_ids) if lead_ids else {}
    for index, conversion in conversions:
        if conversion.callback is not None:
            continue
        if conversion.lead_id in known:
            conversion.callback = known[conversion.lead_id]
        else:
            unknown = f"{conversion.lead_id} is unknown: no tag event has carried this lead id"
            problems.append({"index": index, "errors": {"lead_id": [unknown]}})
    if problems:
        metrics.EVENTS_REFUSED.labels("api", "invalid").inc(len(problems))
        problems.sort(key=lambda problem: problem["index"])
        error_response(
            422,
            "invalid_events",
            f"{len(problems)} of {len(items)} events refused; nothing was stored",
            events=problems,
        )

    conversions = [conversion for _, conversion in conversions]
    results = store.add_conversions(conversions, config.once_per_callback)
    for conversion, result in zip(conversions, results, strict=True):
        counter = (
            metrics.EVENTS_RECEIVED if result.status == "accepted" else metrics.EVENTS_DUPLICATE
        )
        counter.labels("api", str(conversion.event_type)).inc()
    log.info(
        "token %s: %d events, %d accepted",
        g.token_name,
        len(results),
        sum(result.status == "accepted" for result in results),
    )
    return json_response(
        202,
        results=[
            {"index": index, "status": result.status, "id": result.id, "event_id": result.event_id}
            for index, result in enumerate(results)
        ],
    )


@blueprint.route("/event-types", methods=["GET"])
def list_event_types() -> Response:
    once = current_app.config["KS"].once_per_callback
    return jsonify(event_types=[event.to_json(once) for event in catalog.EVENT_TYPES])


@blueprint.route("/openapi.json", methods=["GET"])
def openapi() -> Response:
    return jsonify(openapi_document())
