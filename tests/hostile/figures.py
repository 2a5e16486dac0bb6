"""The hostile suite's figures, gathered in ``test-output/hostile-figures.json`` for the README.

Each test module records its own section; a later run of a module replaces only its section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIGURES_PATH = Path(__file__).resolve().parents[2] / "test-output" / "hostile-figures.json"


def record_figures(section: str, figures: dict[str, Any]) -> None:
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        everything = json.loads(FIGURES_PATH.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[section] = figures
    FIGURES_PATH.write_text(json.dumps(everything, indent=2, sort_keys=True) + "\n")
