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
            "committed before 202 is answered, then relayed to Kuaishou. A batch is "
            "all-or-nothing: one refused event refuses the batch and nothing of it is stored. "
            "An event_id seen before, or a once-per-click event type already stored for its "
            "callback, is answered duplicate and not relayed again."
        },
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema("ConversionEvent", schema=ApiEventSchema)
    event_ref = {"$ref": "#/components/schemas/ConversionEvent"}
    field_errors = {
        "type": "object",
        "description": "what is wrong, by field name",
        "additionalProperties": {"type": "array", "items": {"type": "string"}},
    }
    spec.components.schema(
        "Error",
        {
            "type": "object",
            "properties": {
                "error": {"type": "string", "description": "a stable code, e.g. invalid_events"},
                "message": {"type": "string"},
                "fields": field_errors,
                "events": {
                    "type": "array",
                    "description": "the refused events of a batch (422 invalid_events)",
                    "items": {
                        "type": "object",
                        "properties": {"index": {"type": "integer"}, "errors": field_errors},
                        "required": ["index", "errors"],
                    },
                },
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
                            "id": {
                                "type": "integer",
                                "description": "the stored event (the earlier one if duplicate)",
                            },
                            "event_id": {"type": "string"},
                        },
                        "required": ["index", "status", "id", "event_id"],
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
                            "example": {
                                "event_type": "payment",
                                "callback": "<the click id from the landing URL>",
                                "purchase_amount": 9.9,
                                "event_id": "order-10086",
                            },
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
                            },
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
                    "415": _error("The body is compressed (Content-Encoding); send plain JSON"),
                    "422": _error("One or more events refused; nothing stored"),
                    "503": _error("The store cannot commit now; retry after Retry-After"),
                },
            }
        },
    )
    names = {"type": "array", "items": {"type": "string"}}
    spec.components.schema(
        "EventType",
        {
            "type": "object",
            "properties": {
                "code": {"type": "integer", "description": "Kuaishou's event_type"},
                "name": {"type": "string", "description": "accepted in place of the code"},
                "label": {"type": "string"},
                "industry": {"type": "string"},
                "required_params": names,
                "optional_params": names,
                "once_per_callback": {
                    "type": "boolean",
                    "description": "relayed at most once per click id "
                    "(KS_COLLECTOR_ONCE_PER_CALLBACK)",
                },
                "browser": {"type": "boolean", "description": "static/tag.js may report it"},
                "note": {"type": "string"},
            },
            "required": [
                "code",
                "name",
                "label",
                "industry",
                "required_params",
                "optional_params",
                "once_per_callback",
                "browser",
                "note",
            ],
            "additionalProperties": False,
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
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "event_types": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/EventType"},
                                        }
                                    },
                                    "required": ["event_types"],
                                }
                            }
                        },
                    }
                },
            }
        },
    )
    return spec.to_dict()
