"""structlog configuration: JSON lines in production, a readable console in development."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from app.redaction import redact_errors, redact_secrets


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
