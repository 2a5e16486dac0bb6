"""Schemathesis against ``/api/v1/openapi.json``, in this process through the WSGI app.

Every operation the document lists is called with generated requests (valid per the schema and
deliberately invalid ones) and a valid bearer token; every answer must be below 500 and conform
to the document: declared status codes, JSON error bodies, ``Allow`` on 405 and so on.

One check is left out: ``positive_data_acceptance`` expects every schema-valid event to be
accepted, but the document cannot express the rules that hold between fields (which
parameters an event type takes, exactly one of ``callback`` and ``lead_id``, ``event_time``
within the last days), so schema-valid events are rightly refused with 422.
"""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from tests.hostile.apps import CRM_TOKEN, collector_app
from tests.hostile.figures import record_figures

# Generated requests per operation and phase; the whole module runs in well under two minutes.
EXAMPLES_PER_OPERATION = 600

AUTH = {"Authorization": f"Bearer {CRM_TOKEN}"}

# (method, path, status) → count, over the whole module.
ANSWERS: collections.Counter[tuple[str, str, int]] = collections.Counter()


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    app = collector_app(tmp_path_factory.mktemp("schemathesis"))
    yield schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    record_figures(
        "schemathesis",
        {
            "requests": sum(ANSWERS.values()),
            "server_errors": sum(n for (_, _, status), n in ANSWERS.items() if status >= 500),
            "by_status": {
                str(status): sum(n for (_, _, s), n in ANSWERS.items() if s == status)
                for status in sorted({status for _, _, status in ANSWERS})
            },
        },
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_generated_requests_without_server_errors(case):
    response = case.call(headers=AUTH)
    ANSWERS[(case.method, case.path, response.status_code)] += 1

    case.validate_response(response, headers=AUTH, excluded_checks=[positive_data_acceptance])
