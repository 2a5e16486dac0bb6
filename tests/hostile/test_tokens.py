"""Server API tokens: several named tokens, any of them accepted, none of them ever logged."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.hostile.apps import CRM_TOKEN, SHOP_TOKEN, collector_app
from tests.support.processes import WebProcess, run_cli

API = "/api/v1/conversions"
EVENT = {"event_type": "form", "callback": "CB-TOKEN"}


@pytest.fixture
def client(tmp_path):
    return collector_app(tmp_path).test_client()


def post(client, authorization: str | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.post(API, json=EVENT, headers=headers)


@pytest.mark.parametrize("token", [CRM_TOKEN, SHOP_TOKEN])
def test_each_configured_token_is_accepted(client, token):
    assert post(client, f"Bearer {token}").status_code == 202


def test_request_without_a_token_is_answered_401(client):
    response = post(client, None)

    assert response.status_code == 401
    assert response.get_json() == {
        "error": "unauthorized",
        "message": "send Authorization: Bearer <token>",
    }
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="ks-collector"'


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token-0123456789",
        f"Bearer {CRM_TOKEN[:-1]}",  # a prefix of a real token
        f"Bearer {CRM_TOKEN}x",  # a real token with more after it
        f"Bearer {CRM_TOKEN.upper()}",
        f"Basic {CRM_TOKEN}",
        f"Token {CRM_TOKEN}",
        CRM_TOKEN,
    ],
    ids=["wrong", "prefix", "suffix", "case", "basic", "token-scheme", "no-scheme"],
)
def test_anything_but_a_whole_configured_bearer_token_is_answered_401(client, authorization):
    response = post(client, authorization)

    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"


def test_without_configured_tokens_the_api_is_off(tmp_path):
    client = collector_app(tmp_path, api_tokens="").test_client()

    response = post(client, f"Bearer {CRM_TOKEN}")

    assert response.status_code == 401
    assert response.get_json() == {
        "error": "api_disabled",
        "message": "no API tokens are configured (KS_COLLECTOR_API_TOKENS)",
    }


def test_tokens_never_appear_in_the_log_only_their_names(sqlite_url):
    wrong = "wrong-token-that-must-not-be-logged"
    env = {
        "KS_COLLECTOR_API_TOKENS": f"crm:{CRM_TOKEN},shop:{SHOP_TOKEN}",
        "KS_COLLECTOR_LOG_LEVEL": "DEBUG",
    }
    run_cli(["migrate"], env, database_url=sqlite_url)
    with WebProcess(env, workers=1, database_url=sqlite_url) as web:
        statuses = []
        for token in (CRM_TOKEN, SHOP_TOKEN, wrong, CRM_TOKEN + "x"):
            request = urllib.request.Request(
                web.url + API,
                data=json.dumps(EVENT).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
        # Stopped first, so that every line it would write is in the log.
        web.terminate()
        log = web.log_text()

    assert statuses == [202, 202, 401, 401]
    assert "token crm: 1 events, 1 accepted" in log
    assert "token shop: 1 events, 0 accepted" in log  # the same event again: a duplicate
    for secret in (CRM_TOKEN, SHOP_TOKEN, wrong):
        assert secret not in log
