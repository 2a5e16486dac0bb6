"""``bench/run.py --smoke`` runs every part of the benchmark end to end and writes its table.

The figures of a smoke run are too short to mean anything; what is checked is that each part
ran and reported, and that the run found no beacon answered 2xx without a committed row and no
event sent twice (it exits 1 then).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every row the table must have, in order; PostgreSQL is left out to keep the smoke run short.
EXPECTED_ROWS = [
    "| ingest rate, SQLite",
    "| ingest latency at half load, SQLite",
    "| relay, one process, SQLite, 0 ms upstream",
    "| relay, one process, SQLite, 50 ms upstream",
    "| beacon → upstream",
    "| tag size",
]


def test_smoke_run_reports_every_part_with_a_verdict_per_target(tmp_path: Path) -> None:
    output = tmp_path / "bench.md"

    result = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--no-postgres", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ")][2:]
    assert [row[: len(prefix)] for row, prefix in zip(rows, EXPECTED_ROWS, strict=True)] == (
        EXPECTED_ROWS
    )
    verdicts = [row.strip("|").split("|")[5].strip() for row in rows]
    assert [verdict in ("PASS", "MISS") for verdict in verdicts] == [
        True,
        True,
        False,  # the 0 ms relay row is for information: it has no target
        True,
        True,
        True,
    ]
