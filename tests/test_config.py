"""Settings: values the collector cannot run with are refused at start, naming the variable."""

from __future__ import annotations

import pytest

from collector.config import Config, ConfigError


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        # float() reads these; a NaN timeout failed every call, an infinite lease crashed the relay.
        ("UPSTREAM_TIMEOUT_SECONDS", "nan", "must be a finite number"),
        ("LEASE_SECONDS", "inf", "must be a finite number"),
        ("RETRY_MAX_AGE_HOURS", "1e400", "must be a finite number"),
        ("RETRY_BASE_SECONDS", "0", "must be greater than zero"),
        (
            "UPSTREAM_URL",
            "ftp://files.example.com/x",
            "must be an http:// or https:// URL with a host",
        ),
        ("UPSTREAM_URL", "127.0.0.1:9000", "must be an http:// or https:// URL with a host"),
        # Finite but far beyond any use: milliseconds overflowed 64 bits, time_t overflowed.
        ("LEASE_SECONDS", "1e17", "must be at most 86400"),
        ("RELAY_POLL_SECONDS", "1e300", "must be at most 60"),
        ("MAX_EVENT_AGE_DAYS", "1e305", "must be at most 3660"),
        (
            "UPSTREAM_URL",
            "http://127.0.0.1:abc/x",
            "has a port that is not a number from 1 to 65535",
        ),
        ("RATE_LIMIT_IP", "0/minute", "must allow at least one beacon"),
        ("RATE_LIMIT_IP", "3/minute;1/hour", "one limit only, e.g. 120/minute"),
        (
            "RATE_LIMIT_CALLBACK",
            "abc",
            "expected N/second, N/minute, N/hour or N/day, e.g. 120/minute",
        ),
    ],
)
def test_a_value_the_collector_cannot_run_with_is_refused_by_name(variable, value, reason):
    with pytest.raises(ConfigError) as refused:
        Config.from_env({f"KS_COLLECTOR_{variable}": value})

    assert str(refused.value) == f"KS_COLLECTOR_{variable}={value!r}: {reason}"


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "parsed"),
    [
        ("UPSTREAM_TIMEOUT_SECONDS", "2.5", "upstream_timeout_seconds", 2.5),
        (
            "UPSTREAM_URL",
            "https://127.0.0.1:9000/track",
            "upstream_url",
            "https://127.0.0.1:9000/track",
        ),
        ("RATE_LIMIT_IP", " 10/second ", "rate_limit_ip", "10/second"),
        ("RATE_LIMIT_CALLBACK", "5 per hour", "rate_limit_callback", "5 per hour"),
    ],
)
def test_usable_values_are_taken(variable, value, attribute, parsed):
    config = Config.from_env({f"KS_COLLECTOR_{variable}": value})

    assert getattr(config, attribute) == parsed
