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

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PREFIX = "qm.dlt."
REPLAYED_FROM = "qm.replayed_from"
MAX_ERROR_MESSAGE = 1000

_SECRET_WORDS = r"secret|password|passwd|token|storage_state|cookies?|authorization|api[_-]?key"
REDACTED = "[redacted]"

# a header or JSON field whose name says it holds a secret: its whole value is replaced
_SECRET_NAME = re.compile(_SECRET_WORDS, re.IGNORECASE)

# key=value or "key": "value" pairs whose key names a secret; the value is replaced
_SECRET_KEY = r"""(["']?(?:""" + _SECRET_WORDS + r""")["']?\s*[:=]\s*)"""
_SECRET_PAIR = re.compile(
    _SECRET_KEY + r"""(?!\[redacted\])("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,}\]]+)""",
    re.IGNORECASE,
)
# a secret-named key opening an object or a list: brackets cannot be matched by a regular
# expression, so everything from there to the end is replaced
_SECRET_STRUCTURE = re.compile(
    _SECRET_KEY + r"(?:\{|\[(?!redacted\])).*", re.IGNORECASE | re.DOTALL
)
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
    cleaned = _SECRET_STRUCTURE.sub(lambda m: f"{m.group(1)}{REDACTED}", cleaned)
    cleaned = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}{REDACTED}", cleaned)
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
    original: Sequence[tuple[str, bytes]],
    origin: Origin,
    error: BaseException | str,
    attempts: int,
    failed_at: datetime | None = None,
    message: str | None = None,
) -> list[tuple[str, bytes]]:
    """The original headers (minus stale ``qm.dlt.*`` ones) followed by this failure's."""
    if isinstance(error, BaseException):
        error_class = f"{type(error).__module__}.{type(error).__qualname__}"
        error_message = str(error)
    else:
        error_class, error_message = "InvalidMessage", error
    if message is not None:  # the caller already described (and redacted) the error
        error_message = message
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


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition of a topic."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)
