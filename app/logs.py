"""structlog configuration: JSON lines in production, a readable console in development."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from app.dlt.headers import redact

_SECRET_FIELDS = re.compile(r"(secret|password|storage_state|token_plain|cookie)", re.IGNORECASE)


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any field whose name says it holds a secret."""
    for key in list(event):
        if _SECRET_FIELDS.search(key):
            event[key] = "[redacted]"
    return event


# fields that carry an error's text; a traceback is one (``exception``, after format_exc_info)
_ERROR_FIELDS = ("exception", "error", "error_message", "detail")
_TRACEBACK_LIMIT = 20_000


def redact_errors(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Pass every error text and traceback through the one redaction dead-letter headers get,
    so no process logs a secret an exception happened to carry."""
    for key in _ERROR_FIELDS:
        value = event.get(key)
        if isinstance(value, str):
            event[key] = redact(value, limit=_TRACEBACK_LIMIT)
    return event


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    """Set up structlog (and the stdlib loggers of our libraries) once per process."""
    # colours only on a terminal: escape codes must not land in log files or pipes
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            redact_errors,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
