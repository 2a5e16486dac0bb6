"""Tag size: bytes of static/tag.js as written, minified, and minified then gzipped.

The minified figure is what ``scripts/build-tag`` makes from the current tag.js (the committed
static/tag.min.js may lag behind it; the report says so). gzip at level 9 without a file name
or time stamp, as a server compressing a static file would send it.
"""

from __future__ import annotations

import gzip
import subprocess
from dataclasses import dataclass

from bench.services import ROOT

TAG = ROOT / "static" / "tag.js"
TAG_MIN = ROOT / "static" / "tag.min.js"


@dataclass(frozen=True)
class TagFigures:
    raw: int
    raw_gzipped: int
    minified: int
    minified_gzipped: int
    committed_min_is_current: bool


def gzipped_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def measure_tag() -> TagFigures:
    raw = TAG.read_bytes()
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-tag"), "--stdout"],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        check=False,
    )
    if build.returncode != 0:
        raise RuntimeError(f"scripts/build-tag failed:\n{build.stderr.decode(errors='replace')}")
    minified = build.stdout
    committed = TAG_MIN.read_bytes() if TAG_MIN.is_file() else b""
    return TagFigures(
        raw=len(raw),
        raw_gzipped=gzipped_size(raw),
        minified=len(minified),
        minified_gzipped=gzipped_size(minified),
        committed_min_is_current=committed == minified,
    )
