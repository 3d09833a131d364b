"""Quartermaster's keys: secrets at rest, and the private keys sealed values come to.

At rest: MultiFernet over ``QM_SECRET_KEYS`` (newest first encrypts, all decrypt, so keys rotate
without downtime; `rotate` re-encrypts with the newest).

In transit: values sealed to Quartermaster's public key (the first of ``QM_SEALING_KEYS``,
announced in every grant as ``upload_key``) open with any key of ``QM_SEALING_KEYS``; the sealed
box itself is ``app.sealing``'s, which collectors share.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.sealing import KEY_BYTES, Unsealable, decode_base64, public_key_text, unseal_json

if TYPE_CHECKING:
    from app.settings import Settings


class MissingKey(RuntimeError):
    """A key needed to encrypt or decrypt is not configured."""


class NoSecretKeys(MissingKey):
    """``QM_SECRET_KEYS`` is not set at all: the process's fault, not any stored value's."""


def load_private_key(text: str) -> X25519PrivateKey:
    """One key of ``QM_SEALING_KEYS`` (standard base64 of its 32 raw bytes)."""
    try:
        raw = decode_base64(text.strip(), "a sealing key of QM_SEALING_KEYS")
    except Unsealable as exc:
        raise MissingKey(str(exc)) from None
    if len(raw) != KEY_BYTES:
        raise MissingKey("a sealing key of QM_SEALING_KEYS is not 32 bytes of base64")
    return X25519PrivateKey.from_private_bytes(raw)


# --- Quartermaster's keys ------------------------------------------------------------------


class SecretBox:
    """Encrypts and decrypts Quartermaster's secrets; never logs or repr()s them."""

    def __init__(self, secret_keys: str, sealing_keys: str = "") -> None:
        keys = [k.strip() for k in secret_keys.split(",") if k.strip()]
        try:
            self._keys = [Fernet(k) for k in keys]  # newest first, as QM_SECRET_KEYS lists them
        except (ValueError, TypeError):  # binascii.Error is a ValueError; never say the value
            raise MissingKey(
                "a key of QM_SECRET_KEYS is not a Fernet key (32 url-safe base64 bytes; "
                "README.md says how to make one)"
            ) from None
        self._at_rest = MultiFernet(self._keys) if keys else None
        self._sealing = [load_private_key(k) for k in sealing_keys.split(",") if k.strip()]

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        return cls(
            settings.secret_keys.get_secret_value(), settings.sealing_keys.get_secret_value()
        )

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    def _rest(self) -> MultiFernet:
        if self._at_rest is None:
            raise NoSecretKeys("QM_SECRET_KEYS is not set: secrets at rest cannot be encrypted")
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

    def key_of(self, token: bytes) -> int | None:
        """Which key of ``QM_SECRET_KEYS`` opens a stored secret (0: the newest, which `rotate`
        encrypts with); None when none does (its key was dropped, or it is damaged)."""
        self._rest()
        for index, key in enumerate(self._keys):
            try:
                key.decrypt(token)
            except InvalidToken:
                continue
            return index
        return None

    @property
    def upload_key(self) -> str | None:
        """Quartermaster's public key, to which collectors seal the session states they send."""
        return public_key_text(self._sealing[0]) if self._sealing else None

    def open_upload(self, sealed: str, context: str) -> Any:
        """A value a collector sealed to Quartermaster (any key of ``QM_SEALING_KEYS`` opens)."""
        if not self._sealing:
            raise Unsealable("Quartermaster has no sealing key (QM_SEALING_KEYS is not set)")
        for key in self._sealing:
            try:
                return unseal_json(key, sealed, context)
            except Unsealable:
                continue
        raise Unsealable("the sealed value opens with no key of QM_SEALING_KEYS")
