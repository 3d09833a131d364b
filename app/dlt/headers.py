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

A value too large to travel in its dead letter is kept in PostgreSQL (table ``dlt_values``); the
dead letter's value is then null and ``qm.dlt.value_ref``, ``qm.dlt.value_sha256`` and
``qm.dlt.value_bytes`` say where it is, which digest it has and how long it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from app.redaction import MAX_ERROR_MESSAGE, redact, truncate

PREFIX = "qm.dlt."
REPLAYED_FROM = "qm.replayed_from"
# a value kept in PostgreSQL instead of the dead letter: its row id, SHA-256 and length
VALUE_REF = PREFIX + "value_ref"
VALUE_SHA256 = PREFIX + "value_sha256"
VALUE_BYTES = PREFIX + "value_bytes"

# Kafka header values may be null
Header = tuple[str, bytes | None]


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
    original: Sequence[Header],
    origin: Origin,
    error: BaseException | str,
    attempts: int,
    failed_at: datetime | None = None,
    message: str | None = None,
) -> list[Header]:
    """The original headers, exactly as they came (minus stale ``qm.dlt.*`` ones), followed by
    this failure's. ``message``: the caller's own description of ``error``, already redacted."""
    ours = {
        "original_topic": origin.topic,
        "original_partition": str(origin.partition),
        "original_offset": str(origin.offset),
        "original_timestamp": str(origin.timestamp_ms),
        "consumer_group": origin.consumer_group,
    }
    return failure_headers(original, ours, error, attempts, failed_at, message)


def failure_headers(
    original: Sequence[Header],
    where: dict[str, str],
    error: BaseException | str,
    attempts: int,
    failed_at: datetime | None = None,
    message: str | None = None,
) -> list[Header]:
    """``original`` minus stale ``qm.dlt.*`` headers (a name that was not UTF-8 escaped), then
    ``where`` and the failure's headers."""
    if isinstance(error, BaseException):
        error_class = f"{type(error).__module__}.{type(error).__qualname__}"
        error_message = redact(str(error))
    else:
        error_class, error_message = "InvalidMessage", redact(error)
    if message is not None:
        error_message = truncate(message, MAX_ERROR_MESSAGE)
    ours = {
        **where,
        "error_class": error_class,
        "error_message": error_message,
        "attempts": str(attempts),
        "failed_at": (failed_at or datetime.now(UTC)).isoformat(),
    }
    kept = [
        (printable_header_name(name), value)
        for name, value in original
        if not name.startswith(PREFIX)
    ]
    return kept + [(PREFIX + name, value.encode()) for name, value in ours.items()]


def printable_header_name(name: str) -> str:
    """A header name as a dead letter carries it: one that was not UTF-8 on the wire (read with
    ``surrogateescape``) has its bytes escaped (``\\xff``), the only way a header name can
    travel them."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def value_ref_headers(ref: str, value: bytes) -> list[Header]:
    """The headers of a dead letter whose value is kept in PostgreSQL under ``ref``."""
    return [
        (VALUE_REF, ref.encode()),
        (VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()),
        (VALUE_BYTES, str(len(value)).encode()),
    ]


def header(headers: Sequence[Header], name: str) -> str | None:
    """The last value of a header, decoded leniently, or None (also for a null value)."""
    for key, value in reversed(headers):
        if key == name:
            return None if value is None else value.decode(errors="replace")
    return None


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition of a topic."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)
