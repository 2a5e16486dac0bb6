"""A corpus of malformed requests against a real ``ks-collector web`` (gunicorn), on both stores.

Every request must be answered below 500, over a connection that was not torn down, with a
JSON error body that shows no internals; the server must log no error; and only well-formed
events may reach the outbox. The counts go to ``test-output/hostile-figures.json``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest

from collector.validation import ApiEventSchema
from tests.hostile.apps import CRM_TOKEN
from tests.hostile.figures import record_figures
from tests.support.processes import WebProcess, run_cli

ORIGIN = "https://shop.example.com"
API = "/api/v1/conversions"
COLLECT = "/collect"

# Tag beacon and API event fields, each of which gets every hostile value below.
TAG_FIELDS = ("v", "id", "type", "callback", "age_ms", "lead_id")
API_FIELDS = tuple(ApiEventSchema._declared_fields)

# Raw JSON texts put in place of one field's value.
HOSTILE_VALUES = {
    "null": "null",
    "true": "true",
    "empty string": '""',
    "empty array": "[]",
    "empty object": "{}",
    "nested": '{"a":[{"b":null}]}',
    "negative": "-1",
    "zero": "0",
    "1e400": "1e400",
    "-1e400": "-1e400",
    "1e-400": "1e-400",
    "10**400 as digits": "1" + "0" * 400,
    "10**5000 as digits": "1" + "0" * 5000,
    "digits string": '"' + "9" * 400 + '"',
    "NaN": "NaN",
    "Infinity": "Infinity",
    "NaN string": '"NaN"',
    "float": "3.14159",
    "exponent string": '"1e308"',
    "NUL": '"a\\u0000b"',
    "CRLF": '"a\\r\\nSet-Cookie: x=1"',
    "lone surrogate": '"\\ud800"',
    "fullwidth digits": '"\uff19"',
    "RTL override": '"\u202eabc"',
    "emoji": '"\U0001f600"',
    "script": '"<script>alert(1)</script>"',
    "sql": '"\'; DROP TABLE events; --"',
    "path": '"../../etc/passwd"',
    "url": '"http://169.254.169.254/latest/meta-data/?callback=x"',
    "format": '"%s%n%x{0}"',
    "macro": '"__CALLBACK__"',
    "kilobyte string": '"' + "k" * 1024 + '"',
    "megabyte string": '"' + "m" * (1024 * 1024 - 200) + '"',
}


@dataclass
class Probe:
    """One request of the corpus."""

    name: str
    method: str
    target: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    framed: bool = False  # chunked, and ``body`` already carries its (broken) chunk framing
    cut_off: bool = False  # framed, sent as it is, then the client stops sending (half-close)


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None


def valid_beacon(n: int = 0) -> dict:
    return {"v": 1, "id": f"e{n:031x}", "type": "form", "callback": f"CB-CORPUS-{n}"}


def valid_event(n: int = 0) -> dict:
    return {"event_type": "payment", "callback": f"CB-CORPUS-{n}", "purchase_amount": "9.90"}


def with_raw_value(document: dict, name: str, raw_value: str) -> bytes:
    """``document`` as JSON with field ``name`` set to the raw JSON text ``raw_value``."""
    marker = "__RAW_VALUE__"
    text = json.dumps({**document, name: marker})
    return text.replace(f'"{marker}"', raw_value).encode("utf-8")


def corpus() -> list[Probe]:
    probes: list[Probe] = []
    tag = {"Origin": ORIGIN}
    api = {"Authorization": f"Bearer {CRM_TOKEN}", "Content-Type": "application/json"}

    whole_bodies = {
        "empty": b"",
        "whitespace": b" \r\n ",
        "bad UTF-8": b'{"callback":"\xff\xfe"}',
        "overlong UTF-8": b'{"callback":"\xc0\xaf"}',
        "UTF-8 surrogate bytes": b'{"callback":"\xed\xa0\x80"}',
        "truncated UTF-8": b'{"callback":"\xe4\xb8"}',
        "latin-1": '{"callback":"caf\xe9"}'.encode("latin-1"),
        "UTF-16": json.dumps(valid_beacon()).encode("utf-16"),
        "BOM": b"\xef\xbb\xbf" + json.dumps(valid_beacon()).encode(),
        "NUL bytes": b"\x00" * 64,
        "null": b"null",
        "true": b"true",
        "number": b"42",
        "1e400": b"1e400",
        "10**400": b"1" + b"0" * 400,
        "10**5000": b"1" + b"0" * 5000,
        "NaN": b"NaN",
        "-Infinity": b"-Infinity",
        "string": b'"form"',
        "empty array": b"[]",
        "array of beacon": json.dumps([valid_beacon()]).encode(),
        "array of nulls": b"[null,null]",
        "empty object": b"{}",
        "duplicate keys": b'{"callback":"a","callback":"b","type":"form","id":"e1","v":1}',
        "nested 9": b'{"a":' * 9 + b"1" + b"}" * 9,
        "nested 100": b"[" * 100 + b"]" * 100,
        "nested 5000": b"[" * 5000 + b"]" * 5000,
        "nested 100000": b"[" * 100_000,
        "unterminated": b'{"callback":"abc',
        "trailing garbage": json.dumps(valid_beacon()).encode() + b"}{",
        "two documents": json.dumps(valid_beacon()).encode() * 2,
        "single quotes": b"{'callback':'abc'}",
        "comments": b'{"callback":"abc" /* x */}',
        "form encoded": b"callback=abc&type=form&v=1&id=e1",
        "xml": b"<event><callback>abc</callback></event>",
        "many keys": json.dumps({f"k{i}": i for i in range(5000)}).encode(),
        "long key": json.dumps({"k" * 100_000: 1}).encode(),
        "megabyte": b'{"callback":"' + b"m" * (1024 * 1024) + b'"}',
        "all nulls tag": json.dumps(dict.fromkeys(TAG_FIELDS)).encode(),
        "all nulls api": json.dumps(dict.fromkeys(API_FIELDS)).encode(),
        "batch null": b'{"events":null}',
        "batch object": b'{"events":{}}',
        "batch empty": b'{"events":[]}',
        "batch of nulls": b'{"events":[null,null]}',
        "batch of arrays": b'{"events":[[],[]]}',
        "batch nested": b'{"events":[{"events":[{}]}]}',
        "batch 501": json.dumps({"events": [valid_event(n) for n in range(501)]}).encode(),
        "batch plus extra": json.dumps({"events": [valid_event()], "x": 1}).encode(),
    }
    for path, headers in ((COLLECT, tag), (API, api)):
        for name, body in whole_bodies.items():
            probes.append(Probe(f"{path} {name}", "POST", path, body, dict(headers)))

    for name, raw_value in HOSTILE_VALUES.items():
        for field_name in TAG_FIELDS:
            body = with_raw_value(valid_beacon(), field_name, raw_value)
            probes.append(Probe(f"tag {field_name}={name}", "POST", COLLECT, body, dict(tag)))
        for field_name in API_FIELDS:
            body = with_raw_value(valid_event(), field_name, raw_value)
            probes.append(Probe(f"api {field_name}={name}", "POST", API, body, dict(api)))
        unknown = with_raw_value(valid_beacon(), "unknown", raw_value)
        probes.append(Probe(f"tag unknown={name}", "POST", COLLECT, unknown, dict(tag)))

    for name, raw_value in HOSTILE_VALUES.items():
        lead_only = with_raw_value({"event_type": "form"}, "lead_id", raw_value)
        probes.append(Probe(f"api lead_id alone={name}", "POST", API, lead_only, dict(api)))

    beacon = json.dumps(valid_beacon()).encode()
    for content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/xml",
        "image/png",
        "text/plain; charset=latin-1",
        "application/json; charset=utf-16",
        "*/*",
        "",
    ):
        for path, headers in ((COLLECT, tag), (API, api)):
            typed = {**headers, "Content-Type": content_type}
            name = f"{path} content type {content_type!r}"
            probes.append(Probe(name, "POST", path, beacon, typed))
    multipart = (
        b'--xyz\r\nContent-Disposition: form-data; name="callback"\r\n\r\nabc\r\n--xyz--\r\n'
    )
    multipart_type = {"Content-Type": "multipart/form-data; boundary=xyz"}
    probes.append(Probe("collect multipart", "POST", COLLECT, multipart, {**tag, **multipart_type}))
    probes.append(Probe("api multipart", "POST", API, multipart, {**api, **multipart_type}))

    for name, body in (
        ("chunked beacon", beacon),
        ("chunked 9 KB", b'{"callback":"' + b"c" * 9000 + b'"}'),
        ("chunked 2 MB", b"[" * (2 * 1024 * 1024)),
    ):
        probes.append(Probe(f"collect {name}", "POST", COLLECT, body, dict(tag), chunked=True))
        probes.append(Probe(f"api {name}", "POST", API, body, dict(api), chunked=True))
    for name, framing in (
        ("chunk size not hex", b"zz\r\n{}\r\n0\r\n\r\n"),
        ("chunk without its CRLF", b"2\r\n{}XX0\r\n\r\n"),
    ):
        for where, target, headers in (("collect", COLLECT, tag), ("api", API, api)):
            probes.append(
                Probe(f"{where} {name}", "POST", target, framing, dict(headers), True, True)
            )
    for name, framing in (
        ("chunk cut off", b'3a\r\n{"v":1,"id":"ch1"'),
        ("no last chunk", b"2\r\n{}\r\n"),
    ):
        for where, target, headers in (("collect", COLLECT, tag), ("api", API, api)):
            probes.append(
                Probe(f"{where} {name}", "POST", target, framing, dict(headers), True, True, True)
            )

    for name, query in (
        ("no d", ""),
        ("empty d", "?d="),
        ("bad percent", "?d=%ZZ%"),
        ("bad UTF-8", "?d=%ff%fe%7b%7d"),
        ("two d", "?d=" + quote(beacon.decode()) + "&d=x"),
        ("NaN", "?d=" + quote('{"v":NaN}')),
        ("lone surrogate", "?d=" + quote('{"callback":"\\udc00"}')),
        ("array", "?d=" + quote("[1,2,3]")),
        ("nested", "?d=" + quote("[" * 3000)),
        ("9 KB", "?d=" + "a" * 9000),
    ):
        probes.append(Probe(f"image {name}", "GET", COLLECT + query, headers={"Referer": ORIGIN}))

    for name, value in (
        ("no scheme", "Bearer"),
        ("blank token", "Bearer    "),
        ("basic", "Basic " + "a" * 24),
        ("lower-case scheme", f"bearer {CRM_TOKEN}x"),
        ("8 KB token", "Bearer " + "t" * 8000),
        ("latin-1 token", "Bearer caf\xe9-token-0123456789"),
        ("token with NUL escape", "Bearer \\x00" + CRM_TOKEN),
    ):
        body = json.dumps(valid_event()).encode()
        headers = {"Authorization": value, "Content-Type": "application/json"}
        probes.append(Probe(f"auth {name}", "POST", API, body, headers))

    for name, headers in (
        ("origin without scheme", {"Origin": "shop.example.com"}),
        ("origin garbage", {"Origin": "://%zz"}),
        ("origin IPv6 unclosed", {"Origin": "http://[::1"}),
        ("origin with path", {"Origin": ORIGIN + "/x?y#z"}),
        ("origin userinfo", {"Origin": "https://user:pw@shop.example.com"}),
        ("origin bad port", {"Origin": "https://shop.example.com:99999"}),
        ("referer javascript", {"Referer": "javascript:alert(1)"}),
        ("referer IPv6 unclosed", {"Referer": "http://[::1/x"}),
        ("referer huge", {"Referer": ORIGIN + "/" + "r" * 7000}),
        ("origin and referer differ", {"Origin": "https://evil.example.net", "Referer": ORIGIN}),
    ):
        probes.append(Probe(f"headers {name}", "POST", COLLECT, beacon, headers))

    for method in ("PUT", "DELETE", "PATCH", "TRACE"):
        probes.append(Probe(f"method {method} collect", method, COLLECT, beacon, dict(tag)))
        probes.append(Probe(f"method {method} api", method, API, beacon, dict(api)))
    probes.append(Probe("unknown path", "POST", "/collect/../admin", beacon, dict(tag)))
    probes.append(Probe("long path", "GET", "/" + "p" * 4000))
    return probes


def exchange(port: int, probe: Probe) -> Answer:
    """Send ``probe`` over a fresh connection and read the whole answer (Connection: close)."""
    headers = {"Host": f"127.0.0.1:{port}", "Connection": "close", **probe.headers}
    headers = {name: value for name, value in headers.items() if value != ""}
    if probe.chunked:
        headers["Transfer-Encoding"] = "chunked"
        payload = (
            probe.body
            if probe.framed
            else b"".join(
                b"%x\r\n%s\r\n" % (len(probe.body[i : i + 65536]), probe.body[i : i + 65536])
                for i in range(0, len(probe.body), 65536)
            )
        )
        if not probe.cut_off:
            payload += b"0\r\n\r\n"
    else:
        headers["Content-Length"] = str(len(probe.body))
        payload = probe.body
    if probe.method == "GET":
        headers.pop("Content-Length", None)
    head = f"{probe.method} {probe.target} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # The server may answer early (413) and close; its answer is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head.encode("latin-1") + payload)
            if probe.cut_off:
                sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            if not received:
                return Answer(None, {}, b"", "connection reset without an answer")
    if not received:
        return Answer(None, {}, b"", "connection closed without an answer")
    head_bytes, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split(" ")[1]), answer_headers, body)


@pytest.fixture
def web(database_url):
    env = {
        "KS_COLLECTOR_ALLOWED_ORIGINS": ORIGIN,
        "KS_COLLECTOR_API_TOKENS": f"crm:{CRM_TOKEN}",
        # The corpus comes from one address; limits are tested in tests/test_limits.py.
        "KS_COLLECTOR_RATE_LIMIT_IP": "1000000/minute",
        "KS_COLLECTOR_RATE_LIMIT_CALLBACK": "1000000/minute",
    }
    run_cli(["migrate"], env, database_url=database_url)
    with WebProcess(env, workers=2, threads=4, database_url=database_url) as process:
        yield process, env


def test_malformed_requests_are_answered_below_500_with_json_errors(web, database_url):
    process, env = web
    probes = corpus()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda probe: exchange(process.port, probe), probes))
    stored = run_cli(["events", "--limit", "10000", "--json"], env, database_url=database_url)

    by_status = collections.Counter(answer.status for answer in answers)
    server_errors = [
        (probe.name, answer.status)
        for probe, answer in zip(probes, answers, strict=True)
        if answer.status is None or answer.status >= 500
    ]
    engine = database_url.split(":", 1)[0]
    record_figures(
        f"malformed_corpus_{engine}",
        {
            "requests": len(probes),
            "server_errors": len(server_errors),
            "by_status": {str(status): n for status, n in sorted(by_status.items(), key=str)},
            "stored_events": len(stored.stdout.splitlines()),
        },
    )
    assert server_errors == []

    answered_by_gunicorn = []
    for probe, answer in zip(probes, answers, strict=True):
        assert b"Traceback" not in answer.body, probe.name
        if answer.headers.get("content-type") == "text/html" and answer.status in (400, 414, 431):
            # gunicorn's own answer to a request it would not hand to the app at all.
            answered_by_gunicorn.append(probe.name)
            continue
        assert answer.headers["x-content-type-options"] == "nosniff", probe.name
        assert answer.headers["content-type"] == "application/json", probe.name
        if answer.status != 202:
            document = json.loads(answer.body)
            assert set(document) >= {"error", "message"}, probe.name
    # Its request-line limit (4094 bytes) is below the image beacon's 8 KB: longer image
    # beacons never reach the app.
    assert answered_by_gunicorn == ["image nested", "image 9 KB"]

    log = process.log_text()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    # Exactly the events answered "accepted" were stored, nothing refused slipped in.
    accepted = sum(
        json.loads(answer.body).get("status") == "accepted"
        if "status" in json.loads(answer.body)
        else sum(r["status"] == "accepted" for r in json.loads(answer.body)["results"])
        for answer in answers
        if answer.status == 202
    )
    assert len(stored.stdout.splitlines()) == accepted
