"""The tag script, the demo landing pages, health checks and metrics."""

from __future__ import annotations

import gzip
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
    """The tag to serve: the minified build when there is one, else static/tag.js as written;
    from the source tree, or from the copy installed as ``collector/assets``."""
    here = Path(__file__).resolve().parent
    for directory in (here.parents[1] / "static", here.parent / "assets"):
        for name in ("tag.min.js", "tag.js"):
            if (directory / name).is_file():
                return directory / name
    raise FileNotFoundError("static/tag.js is missing from this installation")


@cache
def tag_bytes() -> tuple[bytes, bytes, str]:
    """(plain, gzipped, ETag), read and compressed once per process."""
    body = tag_path().read_bytes()
    return body, gzip.compress(body, 9, mtime=0), hashlib.sha256(body).hexdigest()[:16]


@blueprint.route("/tag.js")
def tag_js() -> Response:
    plain, gzipped, etag = tag_bytes()
    if "gzip" in request.accept_encodings:
        response = Response(gzipped, mimetype="text/javascript")
        response.headers["Content-Encoding"] = "gzip"
        etag += "-gzip"
    else:
        response = Response(plain, mimetype="text/javascript")
    response.headers["Cache-Control"] = f"public, max-age={TAG_MAX_AGE_SECONDS}"
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.vary.add("Accept-Encoding")
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


def relay_heartbeat_problem(beat_ms: int | None, now: int) -> str | None:
    """Why the relays look absent (for /readyz and ``ks-collector check``), or None if fresh."""
    if beat_ms is None:
        return "no relay heartbeat yet: is a relay running against this store?"
    if now - beat_ms >= RELAY_HEARTBEAT_STALE_MS:
        return f"no relay heartbeat in the last {RELAY_HEARTBEAT_STALE_MS // 1000} s"
    return None


@blueprint.route("/healthz")
def healthz() -> Response:
    """The process is up and answering; says nothing about the store or the relay."""
    response = json_response(200, status="ok")
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.route("/readyz")
def readyz() -> Response:
    """Ready when the store takes a write and a relay reported in recently."""
    store = current_app.config["KS_STORE"]
    checks: dict[str, str] = {}
    try:
        store.check_writable()
        checks["store"] = "ok"
        checks["relay"] = relay_heartbeat_problem(store.latest_heartbeat_ms(), now_ms()) or "ok"
    except StoreUnavailable as error:
        checks["store"] = f"unavailable: {error}"
        checks["relay"] = "unknown"
    ready = all(value == "ok" for value in checks.values())
    response = json_response(
        200 if ready else 503, status="ready" if ready else "not ready", checks=checks
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.route("/metrics")
def metrics_endpoint() -> Response:
    body = metrics.render(current_app.config["KS_STORE"])
    response = Response(body, mimetype="text/plain; version=0.0.4")
    response.headers["Cache-Control"] = "no-store"
    return response
