"""static/tag.min.js is the pinned terser's output for the current static/tag.js.

The build runs ``scripts/build-tag --stdout`` (terser and acorn from package-lock.json, installed
by ``npm ci`` when missing), so these tests need Node.js and npm, as the build does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINIFIED = ROOT / "static" / "tag.min.js"


def build_output() -> bytes:
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-tag"), "--stdout"],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def test_tag_min_js_is_what_the_build_makes_from_tag_js() -> None:
    expected = build_output()

    assert MINIFIED.read_bytes() == expected, (
        "static/tag.min.js is stale: run scripts/build-tag and commit the result"
    )


def test_tag_min_js_parses_as_es5() -> None:
    check = (
        "const source = require('fs').readFileSync(process.argv[1], 'utf8');"
        "require('acorn').parse(source, {ecmaVersion: 5});"
    )
    build_output()  # installs the locked acorn if it is missing

    result = subprocess.run(
        ["node", "-e", check, str(MINIFIED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr


def test_tag_min_js_is_pure_ascii() -> None:
    # A GBK landing page that omits charset on the <script> must still read the tag correctly.
    non_ascii = [byte for byte in MINIFIED.read_bytes() if byte > 0x7F]

    assert non_ascii == []
