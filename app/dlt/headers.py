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
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PREFIX = "qm.dlt."
REPLAYED_FROM = "qm.replayed_from"
MAX_ERROR_MESSAGE = 1000
# a value kept in PostgreSQL instead of the dead letter: its row id, SHA-256 and length
VALUE_REF = PREFIX + "value_ref"
VALUE_SHA256 = PREFIX + "value_sha256"
VALUE_BYTES = PREFIX + "value_bytes"

# Kafka header values may be null
Header = tuple[str, bytes | None]

_SECRET_WORDS = r"secret|password|passwd|token|storage_state|cookies?|authorization|api[_-]?key"
REDACTED = "[redacted]"
# what replaces everything after a secret-named key that opens an object or a list
REDACTED_REST = "[redacted: the rest of the message]"

# a header or JSON field whose name says it holds a secret: its whole value is replaced
_SECRET_NAME = re.compile(_SECRET_WORDS, re.IGNORECASE)

# key=value or "key": "value" pairs whose key names a secret; the value is replaced
_SECRET_KEY = r"""(["']?(?:""" + _SECRET_WORDS + r""")["']?\s*[:=]\s*)"""
_SECRET_PAIR = re.compile(
    _SECRET_KEY + r"""(?!\[redacted[\]:])("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,}\]]+)""",
    re.IGNORECASE,
)
# a secret-named key opening an object or a list: brackets cannot be matched by a regular
# expression, so everything from there to the end is replaced
_SECRET_STRUCTURE = re.compile(
    _SECRET_KEY + r"(?:\{|\[(?!redacted[\]:])).*", re.IGNORECASE | re.DOTALL
)
# the password of a URL's user (``postgresql://user:password@host``, as a connection error or
# an unparsable QM_DATABASE_URL may show it)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(@)", re.IGNORECASE)
# pydantic's "field\n  message [type=…, input_value=…, input_type=…]": the value of a
# secret-named field is on the line after its name
_INPUT_VALUE = re.compile(r"(input_value=).*?(?=, input_type=|\]$|$)")


def _redact_validation_inputs(message: str) -> str:
    lines = message.split("\n")
    for i in range(1, len(lines)):
        if "input_value=" in lines[i] and _SECRET_NAME.search(lines[i - 1]):
            lines[i] = _INPUT_VALUE.sub(lambda m: f"{m.group(1)}{REDACTED}", lines[i])
    return "\n".join(lines)


def redact(message: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """A message fit for a header or a log: secret-looking values replaced, length bounded."""
    cleaned = _redact_validation_inputs(message)
    cleaned = _SECRET_STRUCTURE.sub(lambda m: f"{m.group(1)}{REDACTED_REST}", cleaned)
    cleaned = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}{REDACTED}", cleaned)
    cleaned = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(2)}", cleaned)
    return _truncate(cleaned, limit)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _redact_json(node: Any) -> Any:
    """A parsed JSON document with every secret-named field's value replaced, at any depth."""
    if isinstance(node, dict):
        return {
            key: REDACTED if _SECRET_NAME.search(key) else _redact_json(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_redact_json(item) for item in node]
    if isinstance(node, str):
        return redact(node, limit=len(node) + len(REDACTED) * len(node))
    return node


def redact_bytes(raw: bytes | None, limit: int = MAX_ERROR_MESSAGE) -> str | None:
    """A record's key or value fit for a terminal: secret fields of JSON (or of key=value text)
    replaced whole, decoded leniently, length bounded. None stays None."""
    if raw is None:
        return None
    text = raw.decode(errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        return redact(text, limit)
    cleaned = json.dumps(_redact_json(document), ensure_ascii=False, separators=(",", ":"))
    return _truncate(cleaned, limit)


def redact_header(name: str, value: bytes | None, limit: int = MAX_ERROR_MESSAGE) -> str:
    """A header's value fit for a terminal: all of it hidden when the name says secret."""
    if value is None:
        return ""
    if _SECRET_NAME.search(name):
        return REDACTED
    return redact_bytes(value, limit) or ""


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
        error_message = _truncate(message, MAX_ERROR_MESSAGE)
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
