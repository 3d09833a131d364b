"""The SDK's logging: through the standard library, silent unless the application configures it.

A library should print nothing on its own. The SDK's structlog loggers render into stdlib
records of the ``quartermaster.sdk`` logger; a ``NullHandler`` there (and on ``aiokafka``, whose
records would otherwise reach Python's last-resort handler on stderr) keeps them quiet until the
application sets up logging (``logging.basicConfig(...)``, or its own handlers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

ROOT = "quartermaster.sdk"

for _name in (ROOT, "aiokafka"):
    logging.getLogger(_name).addHandler(logging.NullHandler())


# the SDK logs no secret by construction; this is the net under that, on the fields' names
_SECRET_FIELDS = re.compile(r"(secret|password|storage_state|cookie)", re.IGNORECASE)


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any field whose name says it holds a secret."""
    for key in list(event):
        if _SECRET_FIELDS.search(key):
            event[key] = "[redacted]"
    return event


def sdk_logger(module: str) -> Any:
    """A structlog logger that writes ``event key=value …`` lines to ``quartermaster.sdk.<module>``."""
    name = f"{ROOT}.{module.rsplit('.', 1)[-1]}"
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            redact_secrets,
            structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class _Drop(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextmanager
def said_by_us(logger: str, fragment: str) -> Iterator[None]:
    """Drop ``logger``'s records that contain ``fragment`` meanwhile: the SDK says it itself."""
    drop = _Drop(fragment)
    logging.getLogger(logger).addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(drop)
