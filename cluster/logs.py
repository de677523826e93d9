"""Structured logging: one JSON object per line on stderr, the same in CLI, jobs and replicas.

Use ``log = get_logger(__name__)`` then ``log.info("model.pulled", model=..., seconds=...)``:
the first argument is a stable event name, keyword arguments become fields.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class EventLogger(logging.LoggerAdapter):
    """``log.info("event.name", key=value, ...)``: keyword arguments become JSON fields."""

    def _log_fields(self, level: int, event: str, fields: dict[str, Any]) -> None:
        exc_info = fields.pop("exc_info", None)
        self.logger.log(level, event, extra={"fields": fields}, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self._log_fields(logging.DEBUG, event, fields)

    def info(self, event: str, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self._log_fields(logging.INFO, event, fields)

    def warning(self, event: str, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self._log_fields(logging.WARNING, event, fields)

    def error(self, event: str, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self._log_fields(logging.ERROR, event, fields)


_configured = False


def get_logger(name: str) -> EventLogger:
    """A JSON-lines logger; level from ``ATELIER_LOG_LEVEL`` (default INFO)."""
    global _configured
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        root = logging.getLogger("atelier")
        root.addHandler(handler)
        root.setLevel(os.environ.get("ATELIER_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _configured = True
    return EventLogger(logging.getLogger(f"atelier.{name}"), {})


class Timer:
    """``with Timer() as t: ...; t.seconds`` — wall-clock seconds, for log fields."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)
