"""The Kuaishou client on the wire: the bytes it sends, and answers that misbehave in their bytes.

The client talks to urllib3 directly; before, requests built each call. What reached Kuaishou
must not change: the query, encoded once, byte for byte as requests encoded it, and the same
request head. The upstreams here that misbehave (redirecting, dripping, oversized, truncated)
are raw sockets on 127.0.0.1, since the mock Kuaishou only misbehaves politely.
"""

from __future__ import annotations

import gzip
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from collector.kuaishou import MAX_ANSWER_BYTES, KuaishouClient, build_params
from collector.store import DueEvent, Outcome
from tests.support.mock_kuaishou import MockKuaishou
from tests.test_kuaishou_client import due_event

TIMEOUT_SECONDS = 1.0
OK = b'{"result":1}'

# Click ids with every character that means something in a query or in percent-encoding.
ODD_CLICK_IDS = [
    "a+b/c=d%",
    "Zm9vYmFy+/==",
    "%2B%2F%3D%25",
    "%%%25",
    "a&b=c%2Fd+e f/快手?x#y",
    "~-._!*'()",
    "semi;colon,comma:at@dollar$",
    '[]{}|\\^`"<>',
    " ",
    "",
    "é\U0001f600",
]


def answer(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


class RawUpstream:
    """A socket on 127.0.0.1 that answers each request head with whatever ``handler`` writes.

    ``handler(sock, number)`` gets the connection and the request's number on that connection;
    the connection stays open for the next request until the handler returns False.
    """

    def __init__(self, handler: Callable[[socket.socket, int], bool | None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.heads: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/track/activate"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            buffered = b""
            for number in range(1000):
                while b"\r\n\r\n" not in buffered:
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        return
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                self.heads.append(head)
                try:
                    if self.handler(sock, number) is False:
                        return
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., RawUpstream]]:
    started: list[RawUpstream] = []

    def start(handler: Callable[[socket.socket, int], bool | None]) -> RawUpstream:
        started.append(RawUpstream(handler))
        return started[-1]

    yield start
    for upstream in started:
        upstream.close()


def send_once(url: str, event: DueEvent | None = None):
    client = KuaishouClient(url, TIMEOUT_SECONDS, pool_size=2)
    try:
        return client.send(event or due_event("SECRET+CLICK/ID="))
    finally:
        client.close()


# ---- what is sent ------------------------------------------------------------------------------


@pytest.mark.parametrize("callback", ODD_CLICK_IDS)
def test_query_is_byte_for_byte_what_requests_sent(
    mock_kuaishou: MockKuaishou, callback: str
) -> None:
    event = due_event(callback, purchase_amount="1 2+3", **{"odd name": "v&=?%"})
    client = KuaishouClient(mock_kuaishou.url, TIMEOUT_SECONDS, pool_size=1)
    client.send(event)
    client.close()

    # The reference: how requests (the client before this one) put the same parameters on the URL.
    prepared = requests.Request("GET", mock_kuaishou.url, params=build_params(event)).prepare()
    [call] = mock_kuaishou.requests()
    assert call["query"] == prepared.url.split("?", 1)[1]
    assert call["params"]["callback"] == [callback]


@pytest.mark.parametrize(
    ("callback", "on_the_wire"),
    [
        ("a+b/c=d%", "a%2Bb%2Fc%3Dd%25"),
        ("%2B", "%252B"),
        ("a b", "a+b"),
        ("快", "%E5%BF%AB"),
        ("~-._", "~-._"),
    ],
)
def test_each_character_of_a_click_id_is_encoded_exactly_once(
    mock_kuaishou: MockKuaishou, callback: str, on_the_wire: str
) -> None:
    send_once(mock_kuaishou.url, due_event(callback))

    [call] = mock_kuaishou.requests()
    assert call["query"] == f"callback={on_the_wire}&event_type=3&event_time=1700000000123"


def test_request_head_is_the_one_requests_sent(mock_kuaishou: MockKuaishou) -> None:
    send_once(mock_kuaishou.url)

    [call] = mock_kuaishou.requests()
    assert (call["method"], call["path"]) == ("GET", "/track/activate")
    assert call["headers"] == {
        "host": f"127.0.0.1:{mock_kuaishou.port}",
        "user-agent": "ks-collector",
        "accept-encoding": "identity",
        "accept": "*/*",
        "connection": "keep-alive",
    }


def test_a_query_in_the_configured_url_comes_before_the_events_parameters(
    mock_kuaishou: MockKuaishou,
) -> None:
    send_once(mock_kuaishou.url + "?account=7&x=%2F", due_event("C"))

    [call] = mock_kuaishou.requests()
    assert call["query"] == "account=7&x=%2F&callback=C&event_type=3&event_time=1700000000123"


def test_a_url_the_client_cannot_send_to_fails_each_call_without_sending() -> None:
    answer = send_once("ftp://127.0.0.1:1/track/activate")

    assert (answer.outcome, answer.http_status) == (Outcome.TRANSIENT, None)
    assert (answer.error or "").startswith("InvalidSchema")


# ---- connections -------------------------------------------------------------------------------


def test_threads_share_the_pool_and_reuse_its_connections(mock_kuaishou: MockKuaishou) -> None:
    mock_kuaishou.set_mode("ok", latency_ms=20)
    client = KuaishouClient(mock_kuaishou.url, TIMEOUT_SECONDS, pool_size=4)
    with ThreadPoolExecutor(4) as threads:
        answers = list(threads.map(client.send, [due_event(f"C-{n}") for n in range(60)]))
    client.close()

    assert {a.outcome for a in answers} == {Outcome.DELIVERED}
    calls = mock_kuaishou.requests()
    assert len(calls) == 60
    assert len({call["connection"] for call in calls}) <= 4


def test_a_slow_answer_does_not_shorten_the_next_calls_time_on_the_same_connection(
    mock_kuaishou: MockKuaishou,
) -> None:
    client = KuaishouClient(mock_kuaishou.url, TIMEOUT_SECONDS, pool_size=1)
    # The body of the first answer is read with 0.2 s left of its budget; the socket must not
    # keep that timeout when the connection goes back to the pool.
    mock_kuaishou.set_mode("ok", latency_ms=800)
    first = client.send(due_event())
    mock_kuaishou.set_mode("ok", latency_ms=500)
    second = client.send(due_event())
    client.close()

    assert (first.outcome, second.outcome) == (Outcome.DELIVERED, Outcome.DELIVERED)
    assert len({call["connection"] for call in mock_kuaishou.requests()}) == 1


def test_a_connection_whose_answer_was_cut_off_is_not_used_again(upstreams) -> None:
    # Far over the cap, so most of it is still unread when the client stops reading.
    big = b"x" * (16 * MAX_ANSWER_BYTES)

    calls = itertools.count()

    def first_too_long_then_ok(sock: socket.socket, number: int) -> None:
        sock.sendall(answer(big if next(calls) == 0 else OK))

    upstream = upstreams(first_too_long_then_ok)
    client = KuaishouClient(upstream.url, TIMEOUT_SECONDS, pool_size=1)
    cut, then = client.send(due_event()), client.send(due_event())
    client.close()

    assert (cut.outcome, cut.http_status, cut.error) == (
        Outcome.TRANSIENT,
        200,
        f"answer longer than {MAX_ANSWER_BYTES} bytes",
    )
    assert len(cut.response or "") == 500
    # Reused, the connection would still hold the rest of the long body where an answer should be.
    assert (then.outcome, upstream.connections) == (Outcome.DELIVERED, 2)


def test_a_connection_is_reused_after_an_error_answer_read_to_its_end(upstreams) -> None:
    def fail_then_ok(sock: socket.socket, number: int) -> None:
        sock.sendall(answer(b"busy", "503 Busy") if number == 0 else answer(OK))

    upstream = upstreams(fail_then_ok)
    client = KuaishouClient(upstream.url, TIMEOUT_SECONDS, pool_size=1)
    answers = [client.send(due_event()).outcome for _ in range(2)]
    client.close()

    assert (answers, upstream.connections) == ([Outcome.TRANSIENT, Outcome.DELIVERED], 1)


# ---- answers that misbehave --------------------------------------------------------------------


def test_an_answer_dripping_in_is_cut_at_the_deadline_not_at_the_next_byte(upstreams) -> None:
    def drip(sock: socket.socket, number: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(10):
            time.sleep(0.7)
            sock.sendall(b" ")
        return False

    answer_ = send_once(upstreams(drip).url)

    assert (answer_.outcome, answer_.http_status, answer_.error) == (
        Outcome.TRANSIENT,
        None,
        "no answer within 1 s",
    )
    # Checking the time only when a byte arrives would stop at the second byte, 1.4 s in.
    assert 1000 <= answer_.latency_ms < 1300


def test_an_answer_head_dripping_in_is_cut_at_the_deadline(upstreams) -> None:
    # One header line every 0.3 s: every read gets something, so no read timeout ever fires.
    def drip_head(sock: socket.socket, number: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\n")
        for line in range(30):
            time.sleep(0.3)
            try:
                sock.sendall(b"X-Drip-%d: 1\r\n" % line)
            except OSError:  # the client gave up and shut the connection
                break
        return False

    answer_ = send_once(upstreams(drip_head).url)

    assert (answer_.outcome, answer_.http_status, answer_.error) == (
        Outcome.TRANSIENT,
        None,
        "no answer within 1 s",
    )
    # The watchdog looks every 0.1 s; without it the call lasts the whole 9 s drip.
    assert 1000 <= answer_.latency_ms < 1300


@pytest.mark.parametrize(
    ("head", "drip", "outcome"),
    [
        # A chunk size that never ends: http.client reads it with readline, byte by byte.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0", Outcome.TRANSIENT),
        # The whole answer, then trailer lines without end: the answer itself is complete.
        (
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{"result":1}\r\n0\r\n',
            b"X-Trailer: 1\r\n",
            Outcome.DELIVERED,
        ),
    ],
    ids=["chunk-size", "trailer"],
)
def test_a_chunked_answer_dripping_in_is_cut_at_the_deadline(
    upstreams, head, drip, outcome
) -> None:
    def dripping(sock: socket.socket, number: int) -> bool:
        sock.sendall(head)
        for _ in range(30):
            time.sleep(0.3)
            try:
                sock.sendall(drip)
            except OSError:  # the client gave up and shut the connection
                break
        return False

    answer_ = send_once(upstreams(dripping).url)

    assert answer_.outcome is outcome
    # The body is read inside http.client's own loops: only the watchdog stops them.
    assert 1000 <= answer_.latency_ms < 1300


def test_a_redirect_is_an_answer_and_is_not_followed(upstreams) -> None:
    elsewhere = upstreams(lambda sock, number: sock.sendall(answer(OK)))
    redirecting = upstreams(
        lambda sock, number: sock.sendall(
            answer(b"", "302 Found", f"Location: {elsewhere.url}\r\n")
        )
    )

    answer_ = send_once(redirecting.url)

    assert (answer_.outcome, answer_.http_status, answer_.error) == (
        Outcome.TRANSIENT,
        302,
        "unexpected HTTP 302",
    )
    assert elsewhere.connections == 0


def test_an_answer_cut_short_is_transient_and_keeps_the_click_id_out_of_the_error(
    upstreams,
) -> None:
    def truncated(sock: socket.socket, number: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + OK)
        return False

    answer_ = send_once(upstreams(truncated).url, due_event("SECRET-CLICK-ID"))

    assert (answer_.outcome, answer_.http_status) == (Outcome.TRANSIENT, None)
    assert "ConnectionError" in (answer_.error or "")
    assert "IncompleteRead" in (answer_.error or "")
    assert "SECRET-CLICK-ID" not in (answer_.error or "")


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (
            '{"result":0,"error_msg":"解码失败"}'.encode("gbk"),
            "application/json; charset=GBK",
            "解码失败",
        ),
        ('{"result":0,"error_msg":"解码失败"}'.encode(), "application/json", "解码失败"),
        (
            '{"result":0,"error_msg":"解码失败"}'.encode(),
            "application/json; charset=bogus",
            "解码失败",
        ),
    ],
)
def test_an_answer_is_decoded_with_its_charset_or_else_utf8(
    upstreams, body: bytes, content_type: str, error: str
) -> None:
    upstream = upstreams(
        lambda sock, number: sock.sendall(answer(body, headers=f"Content-Type: {content_type}\r\n"))
    )

    answer_ = send_once(upstream.url)

    assert (answer_.outcome, answer_.error) == (Outcome.REJECTED, error)


def test_a_compressed_answer_sent_despite_identity_is_still_read(upstreams) -> None:
    upstream = upstreams(
        lambda sock, number: sock.sendall(
            answer(gzip.compress(OK), headers="Content-Encoding: gzip\r\n")
        )
    )

    answer_ = send_once(upstream.url)

    assert (answer_.outcome, answer_.response) == (Outcome.DELIVERED, '{"result":1}')


def test_a_chunked_answer_is_read_whole(upstreams) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"res\r\n7\r\nult":1}\r\n0\r\n\r\n'
    )
    upstream = upstreams(lambda sock, number: sock.sendall(chunked))

    answer_ = send_once(upstream.url)

    assert (answer_.outcome, answer_.response) == (Outcome.DELIVERED, '{"result":1}')
