"""A lease's secret: made anew at every grant, sealed to its requester, kept only as a hash.

The lease token is public (every reader of the shared reply topic sees it, and tokens are
sequential); the secret is what makes a lease a capability: only the requester's private key
opens it from ``job.granted``, and every follow-up of the lease must present it
(docs/security.md). The database keeps its SHA-256, which the follow-up's own conditional
statement compares.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import overload

SECRET_BYTES = 32  # 256 random bits


def new_lease_secret() -> str:
    """A fresh secret: ``SECRET_BYTES`` random bytes as URL-safe base64 text without padding."""
    return secrets.token_urlsafe(SECRET_BYTES)


@overload
def lease_secret_hash(secret: str) -> bytes: ...
@overload
def lease_secret_hash(secret: None) -> None: ...
@overload
def lease_secret_hash(secret: str | None) -> bytes | None: ...
def lease_secret_hash(secret: str | None) -> bytes | None:
    """What the database keeps of a secret (None stays None: no stored hash equals it)."""
    if secret is None:
        return None
    return hashlib.sha256(secret.encode()).digest()


def matches(stored_hash: bytes | None, secret: str | None) -> bool:
    """Whether ``secret`` is the one whose hash a lease keeps (never, when either is missing)."""
    if stored_hash is None or secret is None:
        return False
    return hmac.compare_digest(bytes(stored_hash), lease_secret_hash(secret))
