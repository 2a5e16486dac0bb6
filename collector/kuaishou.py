"""The Kuaishou conversion client: one GET per event, and what its answer means.

The upstream URL comes from configuration only. Nothing an event carries can change the host,
the path or add parameters beyond the ones the catalog allows.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from .store import DueEvent, Outcome

# Statuses that mean "not now" rather than "never": timeouts and rate limits.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
# What Kuaishou answers for a callback it cannot decode (the spec's one documented failure).
DECODE_FAILURE = "callbackinfo decodedfailure"
# Kuaishou's answers are tens of bytes; reading more than this only costs memory.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """What one call came to, before the relay decides when to try again."""

    outcome: Outcome
    latency_ms: int
    http_status: int | None = None
    response: str | None = None
    error: str | None = None
    retry_after_seconds: float | None = None


def build_params(event: DueEvent) -> dict[str, str]:
    """The query parameters for one event; ``requests`` percent-encodes each value once."""
    params = {
        "callback": event.callback,
        "event_type": str(event.event_type),
        "event_time": str(event.event_time_ms),
    }
    # The three that identify the conversion come from their own columns, whatever else an
    # event carries.
    params.update((name, value) for name, value in event.params.items() if name not in params)
    return params


def classify(status: int, body: str, headers: dict[str, str] | None = None) -> Answer:
    """Turn an HTTP answer into an outcome (latency is filled in by the caller)."""
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    if status == 200:
        try:
            document = json.loads(body)
        except ValueError:
            return Answer(Outcome.TRANSIENT, 0, status, body, "answer is not JSON")
        # 1 exactly: True == 1 in Python, and a bool is not Kuaishou's success answer.
        if (
            isinstance(document, dict)
            and type(document.get("result")) is int
            and (document["result"] == 1)
        ):
            return Answer(Outcome.DELIVERED, 0, status, body)
        if isinstance(document, dict) and document.get("error_msg"):
            return Answer(Outcome.REJECTED, 0, status, body, str(document["error_msg"])[:200])
        return Answer(
            Outcome.TRANSIENT, 0, status, body, "answer has neither result 1 nor error_msg"
        )
    if status in RETRYABLE_CLIENT_STATUSES or status >= 500:
        return Answer(Outcome.TRANSIENT, 0, status, body, f"HTTP {status}", retry_after)
    if 400 <= status < 500:
        return Answer(Outcome.REJECTED, 0, status, body, f"HTTP {status}")
    return Answer(Outcome.TRANSIENT, 0, status, body, f"unexpected HTTP {status}")


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class KuaishouClient:
    """Sends events over a pool of keep-alive connections shared by the relay's threads."""

    def __init__(self, upstream_url: str, timeout_seconds: float, pool_size: int):
        self.upstream_url = upstream_url
        self.timeout_seconds = timeout_seconds
        self.session = requests.Session()
        # Proxies and .netrc come from configuration, not the environment; skipping the
        # look-ups also takes a third off the cost of each call.
        self.session.trust_env = False
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "ks-collector"
        # Answers are a few dozen bytes; compression would only let a broken upstream send a
        # small body that inflates to a large one.
        self.session.headers["Accept-Encoding"] = "identity"

    def send(self, event: DueEvent) -> Answer:
        """One call, bounded in time and size as a whole: a read timeout alone restarts with
        every byte, and an upstream dripping its answer would outlive the event's lease."""
        started = time.perf_counter()
        deadline = started + self.timeout_seconds
        try:
            response = self.session.get(
                self.upstream_url,
                params=build_params(event),
                timeout=self.timeout_seconds,
                allow_redirects=False,
                stream=True,
            )
            with response:
                body = bytearray()
                # read1: whatever has arrived, so the deadline is checked as bytes trickle in.
                while chunk := response.raw.read1(8192, decode_content=True):
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        return Answer(
                            Outcome.TRANSIENT,
                            _since(started),
                            response.status_code,
                            body[:500].decode("utf-8", "replace"),
                            f"answer longer than {MAX_ANSWER_BYTES} bytes",
                        )
                    if time.perf_counter() > deadline:
                        raise requests.Timeout
        except requests.Timeout:
            return Answer(
                Outcome.TRANSIENT,
                _since(started),
                error=f"no answer within {self.timeout_seconds:g} s",
            )
        except requests.RequestException as error:
            return Answer(Outcome.TRANSIENT, _since(started), error=_short(error))
        text = body.decode(response.encoding or "utf-8", "replace")
        answer = classify(response.status_code, text, response.headers)
        return Answer(
            answer.outcome,
            _since(started),
            answer.http_status,
            answer.response,
            answer.error,
            answer.retry_after_seconds,
        )

    def close(self) -> None:
        self.session.close()


def _since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _short(error: Exception) -> str:
    """An exception as one line: the class and the innermost reason, without the URL's query."""
    text = f"{type(error).__name__}: {error}"
    # urllib3 puts the whole URL, click id included, in its messages; keep the reason only.
    if "Caused by" in text:
        text = type(error).__name__ + ": " + text.split("Caused by", 1)[1].strip(" ()")
    return text[:300]
