"""GET /tag.js: the minified build, gzipped for clients that accept it, cacheable."""

from __future__ import annotations

import gzip
from pathlib import Path

from collector.config import Config
from collector.web import create_app

MINIFIED = Path(__file__).resolve().parents[1] / "static" / "tag.min.js"


def client(sqlite_url: str):
    return create_app(Config.from_env({}, database_url=sqlite_url)).test_client()


def test_tag_is_the_minified_build_gzipped_when_accepted(sqlite_url: str) -> None:
    response = client(sqlite_url).get("/tag.js", headers={"Accept-Encoding": "gzip, br"})

    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Type"].startswith("text/javascript")
    assert gzip.decompress(response.data) == MINIFIED.read_bytes()
    assert "Accept-Encoding" in response.headers["Vary"]


def test_tag_is_plain_without_gzip_and_revalidates_by_etag(sqlite_url: str) -> None:
    tag = client(sqlite_url)
    response = tag.get("/tag.js", headers={"Accept-Encoding": "identity"})

    assert "Content-Encoding" not in response.headers
    assert response.data == MINIFIED.read_bytes()
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    again = tag.get("/tag.js", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304
