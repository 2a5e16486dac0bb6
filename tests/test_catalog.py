"""The event catalog is Kuaishou's event table, once, and everything published derives from it.

Kuaishou's document is kept in the repository (docs/spec/, a copy of the team's shared spec that
scripts/test keeps identical to it where the shared copy is present); these tests read its
event table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from collector import catalog
from collector.config import DEFAULT_ONCE_PER_CALLBACK, Config

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "docs" / "spec" / "kuaishou-conversion-api.md"
EVENT_DOC = REPO / "docs" / "event-catalog.md"
README = REPO / "README.md"
TABLE_START = "<!-- event-table:start -->"
TABLE_END = "<!-- event-table:end -->"

# The money events of the spec's parameter table: payment, credit, product view, cart, orders.
AMOUNT_REQUIRED = {3, 11, 12, 13, 14, 15}
# Events a landing page can witness itself; everything else happens on the advertiser's side.
BROWSER_EVENTS = {9, 51, 64, 138, 179}


def spec_event_rows() -> dict[int, tuple[str, str, str]]:
    """code → (event, industry, notes) from the spec's "Event types" table."""
    assert SPEC.is_file(), f"the Kuaishou spec is missing: expected {SPEC}"
    text = SPEC.read_text(encoding="utf-8")
    section = text.split("## Event types", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows[int(cells[0])] = (cells[1], cells[2], cells[3])
    assert rows, f"no event rows found under '## Event types' in {SPEC}"
    return rows


def spec_industry(rows: dict[int, tuple[str, str, str]], code: int) -> str:
    industry = rows[code][1]
    same_as = re.fullmatch(r"same as (\d+)", industry)
    return spec_industry(rows, int(same_as.group(1))) if same_as else industry


def generated_table() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "collector.catalog", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert result.stderr == ""
    return result.stdout


def test_catalog_has_exactly_the_spec_event_codes():
    assert [event.code for event in catalog.EVENT_TYPES] == sorted(spec_event_rows())
    assert len(catalog.EVENT_TYPES) == 42


def test_each_label_is_the_spec_event_name():
    rows = spec_event_rows()
    for event in catalog.EVENT_TYPES:
        spec_name = rows[event.code][0]
        assert event.label == spec_name[0].upper() + spec_name[1:], event.code


def test_each_industry_is_the_spec_industry():
    rows = spec_event_rows()
    for event in catalog.EVENT_TYPES:
        assert event.industry == spec_industry(rows, event.code), event.code


def test_purchase_amount_is_required_exactly_where_the_spec_says():
    mentioned = {code for code, row in spec_event_rows().items() if "purchase_amount" in row[2]}
    required = {event.code for event in catalog.EVENT_TYPES if catalog.AMOUNT in event.required}
    assert mentioned == AMOUNT_REQUIRED
    assert required == AMOUNT_REQUIRED


def test_no_parameter_other_than_purchase_amount_is_ever_required():
    for event in catalog.EVENT_TYPES:
        assert event.required <= {catalog.AMOUNT}, event.code


def test_event_specific_parameters_belong_to_the_spec_events():
    def optional_on(name: str) -> set[int]:
        return {event.code for event in catalog.EVENT_TYPES if name in event.optional}

    assert optional_on("action_reason") == {120, 121}
    assert optional_on("key_action_category") == {143}
    assert optional_on("key_action_threshold") == {143}
    assert optional_on("novel_chapter_num") == {150, 151}
    assert optional_on("pay_level") == {150, 151}
    assert optional_on("ext_pred_ltv") == {157}
    assert optional_on("ext_pred_pay_ratio") == {157}
    assert optional_on("server_type") == {182}
    assert optional_on("connection_server") == {182}
    assert optional_on(catalog.AMOUNT) == {69, 150, 151}


def test_user_tags_age_is_accepted_with_every_event():
    assert all("user_tags_age" in event.allowed for event in catalog.EVENT_TYPES)


def test_names_are_unique_snake_case_and_never_a_code_or_landing():
    names = [event.name for event in catalog.EVENT_TYPES]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name), name
    assert catalog.LANDING not in names


def test_browser_events_are_the_ones_a_landing_page_witnesses():
    assert {event.code for event in catalog.browser_events()} == BROWSER_EVENTS


def test_once_per_callback_default_is_the_first_only_events():
    assert Config.from_env({}).once_per_callback == frozenset({1, 2, 7, 8, 9, 64, 181})
    assert set(Config.from_env({}).once_per_callback) <= set(catalog.BY_CODE)


def test_once_per_callback_is_configurable():
    config = Config.from_env({"KS_COLLECTOR_ONCE_PER_CALLBACK": "2,9"})
    assert config.once_per_callback == frozenset({2, 9})


@pytest.mark.parametrize(
    ("value", "code"),
    [(9, 9), ("9", 9), (" 9 ", 9), ("form", 9), ("FORM", 9), ("wechat_copy", 64), (182, 182)],
)
def test_lookup_takes_a_code_or_a_name(value, code):
    assert catalog.lookup(value).code == code


@pytest.mark.parametrize("value", [4, "4", "forms", "", True, 9.0, None, "landing", "00009"])
def test_lookup_finds_nothing_for_what_is_not_an_event_type(value):
    assert catalog.lookup(value) is None


def test_event_types_json_lists_the_whole_row():
    row = catalog.BY_CODE[120].to_json(frozenset({1}))
    assert row == {
        "code": 120,
        "name": "phone_contact_failed",
        "label": "Phone contact failed",
        "industry": "franchising, home & building materials, local services, education",
        "required_params": [],
        "optional_params": ["action_reason", "user_tags_age"],
        "once_per_callback": False,
        "browser": False,
        "note": "action_reason 1 suspended, 2 not in service, 3 phone off, 4 rejected, 5 no answer",
    }


def test_markdown_table_has_one_row_per_event_with_every_column():
    table = catalog.markdown_table()
    rows = [line for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == 42
    assert rows[2] == "| 3 | `payment` | Payment | any | `purchase_amount` |  |  |  |"
    assert rows[7] == "| 9 | `form` | Form submitted | any |  |  | yes | yes |"
    assert (
        "| 182 | `game_server_entered` | User entered game server | games |  |"
        " `connection_server`, `server_type` |  |  |"
    ) in rows
    assert f"`{DEFAULT_ONCE_PER_CALLBACK}`" in table


def test_markdown_table_marks_once_per_click_from_the_default_setting():
    table = catalog.markdown_table()
    once = {
        int(line.split("|")[1])
        for line in table.splitlines()
        if re.match(r"^\| \d+ \|", line) and line.split("|")[7].strip() == "yes"
    }
    assert once == {1, 2, 7, 8, 9, 64, 181}


def test_generator_prints_the_markdown_table():
    assert generated_table() == catalog.markdown_table()


def test_generator_without_a_format_fails():
    result = subprocess.run(
        [sys.executable, "-m", "collector.catalog"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "--markdown" in result.stderr


def test_docs_event_catalog_is_the_generated_table():
    assert EVENT_DOC.read_text(encoding="utf-8") == generated_table(), (
        "docs/event-catalog.md is stale: run "
        "`python -m collector.catalog --markdown > docs/event-catalog.md`"
    )


def test_readme_event_table_is_the_generated_table():
    readme = README.read_text(encoding="utf-8") if README.is_file() else ""
    if TABLE_START not in readme:
        return  # the README has no event table (yet); docs/event-catalog.md is still checked
    assert TABLE_END in readme, f"README.md has {TABLE_START} but no {TABLE_END}"
    block = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert block.strip() == generated_table().strip(), (
        "README.md's event table is stale: paste the output of "
        "`python -m collector.catalog --markdown` between the event-table markers"
    )
