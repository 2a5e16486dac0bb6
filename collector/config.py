"""Settings: every tunable in one place, each with a default and a ``KS_COLLECTOR_*`` variable.

The README's configuration table is checked against ``SETTINGS`` by a test, so a setting added
here without documentation fails CI.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import limits

# Kuaishou's conversion endpoint; tests and staging point KS_COLLECTOR_UPSTREAM_URL at a mock.
KUAISHOU_ACTIVATE_URL = "http://ad.partner.gifshow.com/track/activate"

# Event types relayed at most once per click unless configured otherwise (spec: "first only").
DEFAULT_ONCE_PER_CALLBACK = "1,2,7,8,9,64,181"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _parse_event_codes(raw: str) -> frozenset[int]:
    from .catalog import BY_CODE

    codes = frozenset(int(part) for part in raw.split(",") if part.strip())
    unknown = sorted(codes - BY_CODE.keys())
    if unknown:
        raise ValueError(f"not Kuaishou event types: {', '.join(map(str, unknown))}")
    return codes


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# An allowlist entry: `*`; a subdomain pattern `*.example.com`; an origin, exactly as browsers send
# it in `Origin` (`https://shop.example.com`, `http://127.0.0.1:8080`), or one whose host is a
# subdomain pattern (`https://*.example.com`). A trailing slash is forgiven.
_ORIGIN_ENTRY = re.compile(
    r"""\*
    | \*\.[a-z0-9-]+(\.[a-z0-9-]+)*
    | https?://(\*\.)?([a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(:[0-9]{1,5})?/?""",
    re.IGNORECASE | re.VERBOSE,
)


def _parse_origins(raw: str) -> tuple[str, ...]:
    """Refuse what can never match a page's origin: a host without its scheme, a path. Such an
    entry would answer 403 to every beacon of the site it was meant for."""
    entries = _parse_list(raw)
    for entry in entries:
        if _ORIGIN_ENTRY.fullmatch(entry) is None:
            hint = ""
            if "://" not in entry and not entry.startswith("*"):
                hint = f" (did you mean https://{entry}?)"
            elif entry.rstrip("/").count("/") > 2:
                hint = " (an origin has no path)"
            raise ValueError(
                f"{entry!r} is not an origin such as https://shop.example.com, "
                f"*.example.com or *{hint}"
            )
        if re.fullmatch(r"(https://.*:443|http://.*:80)/?", entry, re.IGNORECASE):
            # Browsers leave the scheme's own port out of Origin: this would never match.
            bare = re.sub(r":(443|80)/?$", "", entry)
            raise ValueError(
                f"{entry!r} names the default port, which browsers leave out of the origin "
                f"they send: write {bare}"
            )
    return entries


def _parse_tokens(raw: str) -> dict[str, str]:
    """``name:token,name2:token2`` → ``{token: name}``; names show in logs, tokens never do."""
    tokens: dict[str, str] = {}
    for pair in _parse_list(raw):
        name, sep, token = pair.partition(":")
        if not sep or not name.strip() or len(token.strip()) < 16:
            raise ValueError("each entry must be name:token with a token of 16+ characters")
        tokens[token.strip()] = name.strip()
    return tokens


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _log_format(raw: str) -> str:
    if raw.strip().lower() not in {"text", "json"}:
        raise ValueError("expected text or json")
    return raw.strip().lower()


def _positive(parse: Callable[[str], Any], at_most: float | None = None) -> Callable[[str], Any]:
    def parse_positive(raw: str) -> Any:
        value = parse(raw)
        # float() reads "nan" and "inf": a NaN timeout fails every call, an infinite lease
        # overflows the relay's arithmetic.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if value <= 0:
            raise ValueError("must be greater than zero")
        # Bounds far beyond any use, so that milliseconds fit 64 bits and times fit time_t.
        if at_most is not None and value > at_most:
            raise ValueError(f"must be at most {at_most:g}")
        return value

    return parse_positive


def _http_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    return raw.strip()


def _rate_limit(raw: str) -> str:
    """One limit as `limits` reads it, e.g. ``120/minute``; several (``3/minute;1/hour``) would
    be cut to the first, and ``0/minute`` would refuse every beacon."""
    try:
        items = limits.parse_many(raw)
    except ValueError:
        raise ValueError("expected N/second, N/minute, N/hour or N/day, e.g. 120/minute") from None
    if len(items) != 1:
        raise ValueError("one limit only, e.g. 120/minute")
    if items[0].amount <= 0:
        raise ValueError("must allow at least one beacon")
    return raw.strip()


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


@dataclass(frozen=True)
class Setting:
    """One tunable: its attribute name, environment variable, default text and meaning."""

    attribute: str
    default: str
    parse: Callable[[str], Any]
    help: str

    @property
    def env_name(self) -> str:
        return "KS_COLLECTOR_" + self.attribute.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "database_url",
        "sqlite:///ks-collector.db",
        str,
        "Outbox store: `sqlite:///relative.db`, `sqlite:////absolute.db` or "
        "`postgresql://user:pass@host/db`.",
    ),
    Setting(
        "upstream_url",
        KUAISHOU_ACTIVATE_URL,
        _http_url,
        "Kuaishou's conversion endpoint. Only configuration can change where the relay sends.",
    ),
    Setting(
        "upstream_timeout_seconds",
        "10",
        _positive(float, at_most=600),
        "Connect + read timeout of one call to Kuaishou.",
    ),
    Setting(
        "relay_concurrency", "128", _positive(int), "Requests one relay process keeps in flight."
    ),
    Setting(
        "relay_poll_seconds",
        "0.2",
        _positive(float, at_most=60),
        "How often an idle relay looks for due events.",
    ),
    Setting(
        "lease_seconds",
        "60",
        _positive(float, at_most=86_400),
        "How long a claimed event stays reserved for one relay before another may take it.",
    ),
    Setting(
        "retry_base_seconds",
        "5",
        _positive(float, at_most=86_400),
        "First retry delay; it doubles per attempt, with jitter.",
    ),
    Setting(
        "retry_max_delay_seconds",
        "1800",
        _positive(float, at_most=30 * 86_400),
        "Upper bound of one retry delay (a longer Retry-After is capped to it).",
    ),
    Setting(
        "retry_max_age_hours",
        "72",
        _positive(float, at_most=366 * 24),
        "An event still undelivered this long after it arrived is marked dead.",
    ),
    Setting(
        "max_event_age_days",
        "7",
        _positive(float, at_most=3660),
        "A caller-supplied event_time older than this is refused.",
    ),
    Setting(
        "once_per_callback",
        DEFAULT_ONCE_PER_CALLBACK,
        _parse_event_codes,
        "Event types relayed at most once per click id.",
    ),
    Setting(
        "api_tokens",
        "",
        _parse_tokens,
        "Server API tokens, `name:token,...` (tokens of 16+ characters). Empty: API off.",
    ),
    Setting(
        "allowed_origins",
        "",
        _parse_origins,
        "Landing-page origins allowed to send tag events, e.g. "
        "`https://a.example.com,*.example.org`; `*` allows any. Empty: any origin, and "
        "`serve` refuses to listen beyond loopback.",
    ),
    Setting(
        "require_landing",
        "false",
        _parse_bool,
        "Refuse tag events for a click id the tag never reported landing.",
    ),
    Setting(
        "trusted_proxies",
        "0",
        _non_negative_int,
        "Reverse proxies in front of the collector whose X-Forwarded-For is believed.",
    ),
    Setting(
        "rate_limit_ip",
        "120/minute",
        _rate_limit,
        "Tag beacons allowed per client IP (`N/second|minute|hour|day`).",
    ),
    Setting("rate_limit_callback", "30/minute", _rate_limit, "Tag beacons allowed per click id."),
    Setting(
        "rate_limit_storage_uri",
        "memory://",
        str,
        "Where rate-limit counters live; `redis://host:6379` to share them across machines.",
    ),
    Setting(
        "admin_token",
        "",
        str,
        "Token for the /admin dashboard and its replay button. Empty: dashboard off.",
    ),
    Setting("log_format", "text", _log_format, "`text` or `json`."),
    Setting("log_level", "INFO", _log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL."),
    Setting(
        "metrics_dir",
        "",
        str,
        "A directory of its own for Prometheus multiprocess files (their stale ones are "
        "removed at start); empty: a fresh temporary directory.",
    ),
)

_BY_ATTRIBUTE = {setting.attribute: setting for setting in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Parsed settings; build one with ``Config.from_env()`` or ``Config.from_env(overrides)``."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read every setting from ``environ`` (default ``os.environ``); keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env_name, setting.default)
            try:
                values[setting.attribute] = setting.parse(raw)
            except ValueError as error:
                raise ConfigError(f"{setting.env_name}={raw!r}: {error}") from None
        for name, value in overrides.items():
            if name not in _BY_ATTRIBUTE:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _BY_ATTRIBUTE[name].parse(value) if isinstance(value, str) else value
        # A call may take the whole timeout; a lease running out first would let another relay
        # (or this one) send the same event again while the first call is still going.
        if values["lease_seconds"] < 2 * values["upstream_timeout_seconds"]:
            raise ConfigError(
                "KS_COLLECTOR_LEASE_SECONDS must be at least twice "
                f"KS_COLLECTOR_UPSTREAM_TIMEOUT_SECONDS ({values['lease_seconds']:g} < "
                f"2 x {values['upstream_timeout_seconds']:g})"
            )
        return cls(values)


def settings_markdown() -> str:
    """The README's configuration table, generated so that it cannot drift from the code."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default else "(empty)"
        lines.append(f"| `{setting.env_name}` | {default} | {setting.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
