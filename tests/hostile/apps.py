"""The collector app in this process, for tests that need no gunicorn.

``collector_app`` builds the real Flask app (real SQLite store, migrated) from explicit
settings only: the calling shell's ``KS_COLLECTOR_*`` variables are never read, and the upstream
is a loopback port nothing serves, since these apps run no relay anyway.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from flask import Flask
from prometheus_client import REGISTRY

from collector.config import Config
from collector.web import create_app
from tests.support.processes import UNREACHABLE_UPSTREAM

# A token the API accepts in these apps (named "crm"), and a second one (named "shop").
CRM_TOKEN = "crm-token-4b1d9e0c7a2f"
SHOP_TOKEN = "shop-token-77e0a1c3b5d9"


def collector_app(tmp_path: Path, **settings: Any) -> Flask:
    """A migrated app on ``tmp_path/ks.db``; ``settings`` are Config attributes (strings parsed)."""
    settings.setdefault("database_url", f"sqlite:///{tmp_path / 'ks.db'}")
    settings.setdefault("upstream_url", UNREACHABLE_UPSTREAM)
    settings.setdefault("api_tokens", f"crm:{CRM_TOKEN},shop:{SHOP_TOKEN}")
    app = create_app(Config.from_env({}, **settings))
    app.config["KS_STORE"].migrate()
    return app


def beacon(event_type: str = "form", callback: str = "CB-1", **fields: Any) -> dict[str, Any]:
    """A tag beacon as static/tag.js builds it, with a fresh event id."""
    return {"v": 1, "id": uuid.uuid4().hex, "type": event_type, "callback": callback, **fields}


def beacon_bytes(event_type: str = "form", callback: str = "CB-1", **fields: Any) -> bytes:
    return json.dumps(beacon(event_type, callback, **fields)).encode()


def stored_events(app: Flask) -> list[dict[str, Any]]:
    return app.config["KS_STORE"].list_events(limit=10_000)


def refused_count(source: str, reason: str) -> float:
    """The current value of ``ks_events_refused{source, reason}`` in this process."""
    value = REGISTRY.get_sample_value(
        "ks_events_refused_total", {"source": source, "reason": reason}
    )
    return value or 0.0
