"""Dead letters: the original record plus ``qm.dlt.*`` headers saying where it came from and why.

Header mapping for tools people already use (see docs/dead-letters.md):

| Quartermaster                | Spring Kafka                     | Kafka Connect                          |
| ---------------------------- | -------------------------------- | -------------------------------------- |
| qm.dlt.original_topic        | kafka_dlt-original-topic         | __connect.errors.topic                 |
| qm.dlt.original_partition    | kafka_dlt-original-partition     | __connect.errors.partition             |
| qm.dlt.original_offset       | kafka_dlt-original-offset        | __connect.errors.offset                |
| qm.dlt.original_timestamp    | kafka_dlt-original-timestamp     | -                                      |
| qm.dlt.consumer_group        | kafka_dlt-original-consumer-group| -                                      |
| qm.dlt.error_class           | kafka_dlt-exception-fqcn         | __connect.errors.exception.class.name  |
| qm.dlt.error_message         | kafka_dlt-exception-message      | __connect.errors.exception.message     |
| qm.dlt.attempts              | -                                | -                                      |
| qm.dlt.failed_at             | -                                | -                                      |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "qm.dlt."
REPLAYED_FROM = "qm.replayed_from"
MAX_ERROR_MESSAGE = 1000

# key=value or "key": "value" pairs whose key names a secret; the value is replaced
_SECRET_PAIR = re.compile(
    r"""(?ix)
    (["']?(?:secret|password|passwd|token|storage_state|cookies?|authorization|api[_-]?key)["']?
     \s*[:=]\s*)
    ("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,}\]]+)
    """
)


def redact(message: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """A message fit for a header or a log: secret-looking values replaced, length bounded."""
    cleaned = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}[redacted]", message)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a failed record was read."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    consumer_group: str


def dlt_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return f"{topic}.dlt"


def dead_letter_headers(
    original: Sequence[tuple[str, bytes]],
    origin: Origin,
    error: BaseException | str,
    attempts: int,
    failed_at: datetime | None = None,
) -> list[tuple[str, bytes]]:
    """The original headers (minus stale ``qm.dlt.*`` ones) followed by this failure's."""
    if isinstance(error, BaseException):
        error_class = f"{type(error).__module__}.{type(error).__qualname__}"
        error_message = str(error)
    else:
        error_class, error_message = "InvalidMessage", error
    when = (failed_at or datetime.now(UTC)).isoformat()
    ours = {
        "original_topic": origin.topic,
        "original_partition": str(origin.partition),
        "original_offset": str(origin.offset),
        "original_timestamp": str(origin.timestamp_ms),
        "consumer_group": origin.consumer_group,
        "error_class": error_class,
        "error_message": redact(error_message),
        "attempts": str(attempts),
        "failed_at": when,
    }
    kept = [(name, value) for name, value in original if not name.startswith(PREFIX)]
    return kept + [(PREFIX + name, value.encode()) for name, value in ours.items()]


def header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    """The last value of a header, decoded, or None."""
    for key, value in reversed(headers):
        if key == name:
            return value.decode(errors="replace")
    return None
