"""Secrets at rest (account secrets, session states) and in transit to collectors.

At rest: MultiFernet over ``QM_SECRET_KEYS`` (newest first encrypts, all decrypt, so keys rotate
without downtime; `rotate` re-encrypts with the newest). In transit: the account secret in
``job.granted`` is Fernet-encrypted with ``QM_TRANSPORT_KEY``, which collectors share.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.settings import Settings


class MissingKey(RuntimeError):
    """A key needed to encrypt or decrypt is not configured."""


class SecretBox:
    """Encrypts and decrypts Quartermaster's secrets; never logs or repr()s them."""

    def __init__(self, secret_keys: str, transport_key: str) -> None:
        keys = [k.strip() for k in secret_keys.split(",") if k.strip()]
        self._at_rest = MultiFernet([Fernet(k) for k in keys]) if keys else None
        self._transport = Fernet(transport_key) if transport_key else None

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        return cls(
            settings.secret_keys.get_secret_value(), settings.transport_key.get_secret_value()
        )

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    def _rest(self) -> MultiFernet:
        if self._at_rest is None:
            raise MissingKey("QM_SECRET_KEYS is not set: secrets at rest cannot be encrypted")
        return self._at_rest

    def seal(self, plaintext: str) -> bytes:
        """Encrypt a secret for storage."""
        return self._rest().encrypt(plaintext.encode())

    def open(self, token: bytes) -> str:
        """Decrypt a stored secret."""
        try:
            return self._rest().decrypt(token).decode()
        except InvalidToken:
            raise MissingKey(
                "a stored secret does not decrypt with any key of QM_SECRET_KEYS"
            ) from None

    def seal_json(self, value: dict[str, Any]) -> bytes:
        return self.seal(json.dumps(value, separators=(",", ":")))

    def open_json(self, token: bytes) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.open(token))
        return result

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt a stored secret with the newest key."""
        return self._rest().rotate(token)

    def for_collector(self, plaintext: str) -> str:
        """Encrypt a secret for a collector with the transport key."""
        if self._transport is None:
            raise MissingKey("QM_TRANSPORT_KEY is not set: secrets cannot be sent to collectors")
        return self._transport.encrypt(plaintext.encode()).decode()
