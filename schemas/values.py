"""The bounds of values the database and X25519 can take, checked before anything else runs.

A value past these is bad input (``request.invalid``), never an error deep in a transaction.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import AfterValidator, Field, StringConstraints

from schemas.nesting import MAX_NESTING, nesting_depth

BIGINT_MAX = 2**63 - 1  # PostgreSQL's bigint
INTEGER_MAX = 2**31 - 1  # PostgreSQL's integer

BigInt = Annotated[int, Field(ge=0, le=BIGINT_MAX)]

# Any fixed clamped scalar (a multiple of 8) times a point of small order is the identity, whose
# shared secret is all zero: OpenSSL refuses exactly those, whatever the encoding (u >= p, or
# the ignored top bit set), so one exchange tells a usable key from one an attacker chose.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(32)))


@functools.lru_cache(maxsize=4096)  # a collector names one key in all its requests: one exchange
def x25519_refuses(raw: bytes) -> bool:
    """Whether X25519 cannot exchange with the public key ``raw`` (32 bytes): a point of small
    order (the all-zero key among them) in any of its encodings."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return True
    return False


def usable_public_key(text: str) -> str:
    """``text`` when it is standard base64 of a 32-byte X25519 key X25519 can use."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64") from None
    if len(raw) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    if x25519_refuses(raw):
        raise ValueError("X25519 refuses this key (a point of small order)")
    return text


def seed_id(text: str) -> str:
    """``text`` when it is a seed's id: ASCII digits of a bigint (no sign, no other digits)."""
    if not (text.isascii() and text.isdigit()) or int(text) > BIGINT_MAX:
        raise ValueError(f"a seed id is ASCII digits of at most {BIGINT_MAX}")
    return text


SeedId = Annotated[str, Field(min_length=1, max_length=19), AfterValidator(seed_id)]


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(value, allow_nan=False)  # NaN and Infinity are no JSON: PostgreSQL refuses
    if len(text) > 1_000_000:
        raise ValueError("larger than 1 MB")
    if nesting_depth(text.encode()) > MAX_NESTING - 2:  # within a request, itself an object
        raise ValueError(f"nested deeper than {MAX_NESTING - 2} levels")
    return value


def _in_utc_range(value: datetime) -> datetime:
    """A time that has a UTC form (year 1 with a positive offset has none: it would overflow)."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None
    return value


UtcTime = Annotated[datetime, AfterValidator(_in_utc_range)]


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded_json)]


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("only http(s) URLs are accepted")
    return value


HttpUrl = Annotated[str, StringConstraints(max_length=4096), AfterValidator(_http_url)]


def holds_nul(value: Any) -> bool:
    """Whether a text of ``value``, nested keys and values included, holds a NUL character."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(holds_nul(item) for item in value)
    return False
