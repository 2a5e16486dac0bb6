"""Log setup: one line per event, plain text by default, JSON for log pipelines.

Every process (``serve``, gunicorn's master and workers, the relay) logs to stderr through the
root logger configured here, gunicorn's own messages included, so with
``KS_COLLECTOR_LOG_FORMAT=json`` every line of the output is one JSON object.

Lines name events by their outbox id and click ids by a short prefix (``relay.short_callback``);
nothing personal is logged. Fields given with ``extra={...}`` become keys of the JSON object, so
a log pipeline can filter on them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from gunicorn.glogging import Logger as _GunicornBaseLogger

# Log formats KS_COLLECTOR_LOG_FORMAT accepts.
LOG_FORMATS = ("text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, extras, and any error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str, level: str) -> None:
    """Send every logger's records to stderr in ``log_format``: ``json``, else plain text.

    An unknown format falls back to text rather than stopping the collector; ``ks-collector
    check`` reports it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3's debug lines hold each request's whole URL, the click id included.
    logging.getLogger("urllib3").setLevel(logging.INFO)


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's error log through the root logger, so it shares the collector's format."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.error_log.handlers[:] = []
        self.error_log.propagate = True
