"""Kafka record headers: the reader every consumer uses, and a header name made printable."""

from __future__ import annotations

from collections.abc import Sequence

# Kafka header values may be null
Header = tuple[str, bytes | None]


def header(headers: Sequence[Header], name: str) -> str | None:
    """The last value of a header, decoded leniently, or None (also for a null value)."""
    for key, value in reversed(headers):
        if key == name:
            return None if value is None else value.decode(errors="replace")
    return None


def printable_header_name(name: str) -> str:
    """A header name as a dead letter carries it: one that was not UTF-8 on the wire (read with
    ``surrogateescape``) has its bytes escaped (``\\xff``), the only way a header name can
    travel them."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name
