"""The tag script, the demo landing pages, health checks and metrics."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, current_app, render_template, request

from .. import metrics
from ..store import StoreUnavailable
from ..validation import now_ms
from .http import json_response

# Browsers and CDNs may keep the tag this long; a new release reaches pages within the hour.
TAG_MAX_AGE_SECONDS = 3600
# /readyz fails when no relay has reported in for this long.
RELAY_HEARTBEAT_STALE_MS = 30_000

blueprint = Blueprint("pages", __name__)


def tag_path() -> Path:
    """static/tag.js from the source tree, or the copy installed as ``collector/assets``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "static" / "tag.js", here.parent / "assets" / "tag.js"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("static/tag.js is missing from this installation")


@cache
def tag_bytes() -> tuple[bytes, str]:
    body = tag_path().read_bytes()
    return body, hashlib.sha256(body).hexdigest()[:16]


@blueprint.route("/tag.js")
def tag_js() -> Response:
    body, etag = tag_bytes()
    response = Response(body, mimetype="text/javascript")
    response.headers["Cache-Control"] = f"public, max-age={TAG_MAX_AGE_SECONDS}"
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.set_etag(etag)
    return response.make_conditional(request)


@blueprint.route("/demo")
def demo_landing() -> str:
    return render_template("demo_landing.html")


@blueprint.route("/demo/signup")
def demo_signup() -> str:
    return render_template("demo_signup.html")


@blueprint.route("/demo/thanks", methods=["GET", "POST"])
def demo_thanks() -> str:
    # Only the hidden click-id field is read back, to show what the advertiser's backend gets.
    return render_template("demo_thanks.html", lead_callback=request.form.get("ks_callback"))


@blueprint.route("/healthz")
def healthz() -> Response:
    return json_response(200, status="ok")


@blueprint.route("/readyz")
def readyz() -> Response:
    """Ready when the store takes a write and a relay reported in recently."""
    store = current_app.config["KS_STORE"]
    checks: dict[str, str] = {}
    try:
        store.check_writable()
        checks["store"] = "ok"
        beat = store.latest_heartbeat_ms()
        fresh = beat is not None and now_ms() - beat < RELAY_HEARTBEAT_STALE_MS
        checks["relay"] = "ok" if fresh else "no relay heartbeat in the last 30 s"
    except StoreUnavailable as error:
        checks["store"] = f"unavailable: {error}"
        checks["relay"] = "unknown"
    ready = all(value == "ok" for value in checks.values())
    return json_response(
        200 if ready else 503, status="ready" if ready else "not ready", checks=checks
    )


@blueprint.route("/metrics")
def metrics_endpoint() -> Response:
    body = metrics.render(current_app.config["KS_STORE"])
    return Response(body, mimetype="text/plain; version=0.0.4")
