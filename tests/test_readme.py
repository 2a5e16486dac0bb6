"""The README states facts the code owns; these tests keep the two equal."""

from __future__ import annotations

import re
from pathlib import Path

from collector.config import SETTINGS, settings_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def block(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def test_readme_settings_table_is_generated_from_config() -> None:
    assert block("settings-table") == settings_markdown()


def test_every_setting_is_documented_with_its_variable_name() -> None:
    table = block("settings-table")
    for setting in SETTINGS:
        assert f"`{setting.env_name}`" in table


def test_quick_start_has_exactly_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick_start, re.S)
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/ks-collector serve",
        "bash scripts/test",
    ]
