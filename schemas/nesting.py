"""How deep a JSON document nests, told from its bytes before any parser recurses into it."""

from __future__ import annotations

import re

MAX_NESTING = 32  # no request nests deeper than a few levels; a parser recursing on it might fail
# a JSON string (its escapes included), then any byte that is not a bracket: what the scan skips
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


class NestingTooDeep(ValueError):
    """A JSON document nested deeper than any request is (``MAX_NESTING``)."""


def nesting_depth(raw: bytes, limit: int = MAX_NESTING) -> int:
    """How deep ``raw``'s JSON brackets nest, counted up to ``limit + 1``: a scan of the bytes
    that parses nothing, so it costs the same however deep they go."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest
