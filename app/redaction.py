"""Secrets kept out of text: what logs, dead-letter headers and terminals show of a message.

Pure functions (the standard library only), shared by the server's logging (``app.logs``), its
dead letters (``app.dlt``) and the collector SDK (``app.sdk.logs``), which must not import the
server.
"""

from __future__ import annotations

import json
import re
from collections.abc import MutableMapping
from typing import Any

# how long an error message may be in a dead-letter header or a log line
MAX_ERROR_MESSAGE = 1000

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
    return truncate(cleaned, limit)


def truncate(text: str, limit: int) -> str:
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
    return truncate(cleaned, limit)


def redact_header(name: str, value: bytes | None, limit: int = MAX_ERROR_MESSAGE) -> str:
    """A header's value fit for a terminal: all of it hidden when the name says secret."""
    if value is None:
        return ""
    if _SECRET_NAME.search(name):
        return REDACTED
    return redact_bytes(value, limit) or ""


# --- structlog processors -----------------------------------------------------------------

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
