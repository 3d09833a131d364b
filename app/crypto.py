"""Secrets at rest (account secrets, session states) and in transit, sealed to their reader.

At rest: MultiFernet over ``QM_SECRET_KEYS`` (newest first encrypts, all decrypt, so keys rotate
without downtime; `rotate` re-encrypts with the newest).

In transit: a *sealed box* (docs/security.md): X25519 between a fresh ephemeral key and the
reader's public key, HKDF-SHA256 to an AES-256-GCM key, the context string as associated data.
The secret and the session in ``job.granted`` are sealed to the public key the collector sent in
its ``job.start``; session states a collector sends are sealed to Quartermaster's public key (the
first of ``QM_SEALING_KEYS``, announced in every grant as ``upload_key``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from schemas.values import x25519_refuses

if TYPE_CHECKING:
    from app.settings import Settings

SEAL_VERSION = 1
SEAL_INFO = b"quartermaster sealed box v1"
_KEY_BYTES = 32
_NONCE_BYTES = 12


class MissingKey(RuntimeError):
    """A key needed to encrypt or decrypt is not configured."""


class NoSecretKeys(MissingKey):
    """``QM_SECRET_KEYS`` is not set at all: the process's fault, not any stored value's."""


class Unsealable(ValueError):
    """A sealed value that does not open: wrong key, wrong context, damaged or not sealed."""


# --- sealed boxes --------------------------------------------------------------------------


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Unsealable(f"{what} is not standard base64") from None


def public_key_text(key: X25519PrivateKey | X25519PublicKey) -> str:
    """A public key as it travels: standard base64 of its 32 raw bytes."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def load_public_key(text: str) -> X25519PublicKey:
    """A public key to seal to; ``Unsealable`` when it is not one X25519 can use."""
    raw = _b64decode(text, "the public key")
    if len(raw) != _KEY_BYTES:
        raise Unsealable("a public key is 32 bytes")
    if x25519_refuses(raw):
        raise Unsealable("X25519 refuses the public key (a point of small order)")
    return X25519PublicKey.from_public_bytes(raw)


def private_key_text(key: X25519PrivateKey) -> str:
    """A private key for ``QM_SEALING_KEYS``: standard base64 of its 32 raw bytes."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def load_private_key(text: str) -> X25519PrivateKey:
    raw = _b64decode(text.strip(), "a sealing key")
    if len(raw) != _KEY_BYTES:
        raise MissingKey("a sealing key of QM_SEALING_KEYS is not 32 bytes of base64")
    return X25519PrivateKey.from_private_bytes(raw)


def _aead_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=SEAL_INFO
    ).derive(shared)
    return AESGCM(key)


def seal(recipient: X25519PublicKey, plaintext: bytes, context: str) -> str:
    """``plaintext`` sealed to ``recipient``: only its private key opens it, for ``context``.

    Layout (then standard base64): version byte 1, the ephemeral public key (32 bytes), the
    nonce (12 bytes), AES-256-GCM ciphertext with its 16-byte tag.
    """
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    recipient_raw = recipient.public_bytes(Encoding.Raw, PublicFormat.Raw)
    aead = _aead_key(ephemeral.exchange(recipient), ephemeral_raw, recipient_raw)
    nonce = os.urandom(_NONCE_BYTES)
    sealed = aead.encrypt(nonce, plaintext, context.encode())
    return base64.b64encode(bytes([SEAL_VERSION]) + ephemeral_raw + nonce + sealed).decode()


def unseal(private: X25519PrivateKey, sealed: str, context: str) -> bytes:
    """Open a sealed box addressed to ``private``'s public key for ``context``."""
    raw = _b64decode(sealed, "a sealed value")
    head = 1 + _KEY_BYTES + _NONCE_BYTES
    if len(raw) < head + 16 or raw[0] != SEAL_VERSION:
        raise Unsealable("not a version 1 sealed box")
    ephemeral_raw, nonce = raw[1 : 1 + _KEY_BYTES], raw[1 + _KEY_BYTES : head]
    recipient_raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
    try:
        return _aead_key(shared, ephemeral_raw, recipient_raw).decrypt(
            nonce, raw[head:], context.encode()
        )
    except InvalidTag:
        raise Unsealable("the sealed value does not open with this key and context") from None


def seal_json(recipient: X25519PublicKey, value: Any, context: str) -> str:
    return seal(recipient, json.dumps(value, separators=(",", ":")).encode(), context)


def unseal_json(private: X25519PrivateKey, sealed: str, context: str) -> Any:
    try:
        return json.loads(unseal(private, sealed, context))
    except ValueError as exc:
        if isinstance(exc, Unsealable):
            raise
        raise Unsealable("the sealed value is not JSON") from None


# --- Quartermaster's keys ------------------------------------------------------------------


class SecretBox:
    """Encrypts and decrypts Quartermaster's secrets; never logs or repr()s them."""

    def __init__(self, secret_keys: str, sealing_keys: str = "") -> None:
        keys = [k.strip() for k in secret_keys.split(",") if k.strip()]
        self._at_rest = MultiFernet([Fernet(k) for k in keys]) if keys else None
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
