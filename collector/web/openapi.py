"""The OpenAPI 3 description of ``/api/v1``, generated from the marshmallow schemas."""

from __future__ import annotations

from functools import cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from .. import __version__, catalog
from ..validation import MAX_BATCH_EVENTS, ApiEventSchema


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


@cache
def openapi_document() -> dict:
    spec = APISpec(
        title="ks-collector conversion API",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Report Kuaishou conversions from your servers. Events are "
            "committed before 202 is answered and relayed to Kuaishou."
        },
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema("ConversionEvent", schema=ApiEventSchema)
    event_ref = {"$ref": "#/components/schemas/ConversionEvent"}
    spec.components.schema(
        "Error",
        {
            "type": "object",
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "fields": {"type": "object"},
                "events": {"type": "array", "items": {"type": "object"}},
            },
            "required": ["error", "message"],
        },
    )
    spec.components.schema(
        "Results",
        {
            "type": "object",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "index": {"type": "integer"},
                            "status": {"type": "string", "enum": ["accepted", "duplicate"]},
                            "id": {"type": "integer"},
                            "event_id": {"type": "string"},
                        },
                    },
                }
            },
        },
    )
    spec.path(
        path="/api/v1/conversions",
        operations={
            "post": {
                "summary": "Report one conversion or a batch (all-or-nothing)",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    event_ref,
                                    {
                                        "type": "object",
                                        "required": ["events"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "events": {
                                                "type": "array",
                                                "items": event_ref,
                                                "minItems": 1,
                                                "maxItems": MAX_BATCH_EVENTS,
                                            }
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "202": {
                        "description": "Committed; each event accepted or a duplicate",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Results"}}
                        },
                    },
                    "400": _error("The body is not JSON"),
                    "401": _error("Missing or invalid bearer token"),
                    "413": _error("The body is too large"),
                    "422": _error("One or more events refused; nothing stored"),
                    "503": _error("The store cannot commit now; retry after Retry-After"),
                },
            }
        },
    )
    spec.path(
        path="/api/v1/event-types",
        operations={
            "get": {
                "summary": "The Kuaishou event catalog",
                "responses": {
                    "200": {
                        "description": f"{len(catalog.EVENT_TYPES)} event types",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    )
    return spec.to_dict()
