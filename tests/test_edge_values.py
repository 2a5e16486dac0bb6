"""Values an adversarial review found mishandled: each is refused or kept right, never a 500."""

from __future__ import annotations

import pytest

from tests.support.processes import run_cli
from tests.test_api import Api

ADMIN_TOKEN = "admin-token-0123456789abcdef"
TOO_BIG = str(2**63)


@pytest.fixture
def api(sqlite_url: str) -> Api:
    return Api(sqlite_url, admin_token=ADMIN_TOKEN)


@pytest.mark.parametrize("event_type", ["²", "①", "٩"])
def test_non_ascii_digits_are_not_event_codes(api: Api, event_type: str) -> None:
    response = api.post({"event_type": event_type, "callback": "CLICK-1"})
    assert response.status_code == 422
    assert "event_type" in response.json["events"][0]["errors"]

    beacon = api.beacon(type=event_type, callback="CLICK-1")
    assert beacon.status_code == 422
    assert api.rows() == []


@pytest.mark.parametrize(
    ("pasted", "callback"),
    [
        ("https://landing.example/?callback=AbC+dEf/gh==", "AbC+dEf/gh=="),
        ("https://landing.example/#/page?callback=HASHCB", "HASHCB"),
        ("http://[::1/?callback=v6", "v6"),
        ("https%3A%2F%2Flanding.example%2F%3Fcallback%3DAB%252B", "AB+"),
    ],
)
def test_pasted_landing_urls_are_unwrapped_to_their_exact_callback(
    api: Api, pasted: str, callback: str
) -> None:
    response = api.post({"event_type": "deal", "callback": pasted})
    assert response.status_code == 202, response.json
    assert [row["callback"] for row in api.rows()] == [callback]


def test_an_event_id_with_a_trailing_newline_is_refused(api: Api) -> None:
    response = api.post({"event_type": "deal", "callback": "CLICK-1", "event_id": "abc\n"})
    assert response.status_code == 422
    assert response.json["events"][0]["errors"]["event_id"] == [
        "must be 1 to 128 letters, digits or . _ : -"
    ]


def test_dashboard_answers_ids_beyond_64_bits_without_an_error(api: Api) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert api.client.get(f"/admin/?before={TOO_BIG}", headers=auth).status_code == 200
    assert api.client.get(f"/admin/events/{TOO_BIG}", headers=auth).status_code == 404


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "--id", TOO_BIG],
        ["replay", "--since", "99999999999999d"],
        ["purge", "--older-than", "999999999999d"],
        ["stats", "--since", "99999999999999999d"],
    ],
)
def test_cli_refuses_numbers_beyond_range_as_usage_errors(sqlite_url: str, args) -> None:
    run_cli(["migrate"], database_url=sqlite_url)
    result = run_cli(args, database_url=sqlite_url, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
