"""ks-collector: Kuaishou ad conversions from landing pages and servers, relayed durably."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from flask import Flask


def create_app(*args: Any, **kwargs: Any) -> Flask:
    """The Flask app factory (``collector.create_app``); see ``collector.web.create_app``."""
    from .web import create_app as build

    return build(*args, **kwargs)
