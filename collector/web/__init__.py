"""The web layer: HTTP in and out only. Validation, storage and delivery live below it."""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..store import SqlStore, StoreUnavailable, open_store
from . import admin, api, collect, limits, pages
from .http import json_response

log = logging.getLogger("ks_collector.web")

# Seconds a client should wait before retrying when the store could not commit.
STORE_RETRY_AFTER_SECONDS = 2


def create_app(config: Config | None = None, store: SqlStore | None = None) -> Flask:
    """Build the collector app; the store's connections open lazily in each worker process."""
    config = config or Config.from_env()
    app = Flask(__name__, template_folder="../templates")
    app.config["KS"] = config
    app.config["KS_STORE"] = store or open_store(config.database_url)
    app.json.sort_keys = False

    app.register_blueprint(collect.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(admin.blueprint)
    limits.trust_proxies(app, config.trusted_proxies)
    app.extensions["ks_rate_limits"] = limits.RateLimits(config)
    app.register_error_handler(StoreUnavailable, store_unavailable)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.after_request(security_headers)
    return app


def store_unavailable(error: StoreUnavailable) -> Response:
    log.error("store unavailable for %s %s: %s", request.method, request.path, error)
    response = json_response(
        503, error="store_unavailable", message="the event could not be committed; retry later"
    )
    response.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
    return response


def http_error(error: HTTPException) -> Response:
    if error.response is not None:  # already a JSON answer built by error_response()
        return error.response
    name = (error.name or "error").lower().replace(" ", "_")
    response = json_response(error.code or 500, error=name, message=error.description or name)
    # Keep what the error says besides its HTML body: Allow on a 405, WWW-Authenticate on a 401.
    for header, value in error.get_headers():
        if header.lower() != "content-type":
            response.headers[header] = value
    return response


def unexpected_error(error: Exception) -> Response:
    log.exception("unexpected error for %s %s", request.method, request.path)
    return json_response(500, error="internal_error", message="an unexpected error occurred")


def security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "strict-origin-when-cross-origin")
    if response.mimetype == "text/html":
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'unsafe-inline'; frame-ancestors 'none'",
        )
        headers.setdefault("X-Frame-Options", "DENY")
    else:
        headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    if request.path == "/tag.js":
        headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    return response
