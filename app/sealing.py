"""Sealed boxes: values sealed to the public key of their only reader (docs/security.md).

X25519 between a fresh ephemeral key and the reader's public key, HKDF-SHA256 to an AES-256-GCM
key, the context string as associated data. The secret and the session in ``job.granted`` are
sealed to the public key the collector sent in its ``job.start``; session states a collector sends
are sealed to Quartermaster's public key (announced in every grant as ``upload_key``).

Both sides use it: the server (``app.crypto`` holds its keys) and the collector SDK, so it
imports nothing of the server, only ``cryptography`` and the wire contract.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
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

from schemas.nesting import MAX_NESTING, nesting_depth
from schemas.values import x25519_refuses

SEAL_VERSION = 1
SEAL_INFO = b"quartermaster sealed box v1"
KEY_BYTES = 32
_NONCE_BYTES = 12


class Unsealable(ValueError):
    """A sealed value that does not open: wrong key, wrong context, damaged or not sealed."""


def decode_base64(text: str, what: str) -> bytes:
    """Standard base64 decoded; ``Unsealable`` naming ``what`` when it is not."""
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
    raw = decode_base64(text, "the public key")
    if len(raw) != KEY_BYTES:
        raise Unsealable("a public key is 32 bytes")
    if x25519_refuses(raw):
        raise Unsealable("X25519 refuses the public key (a point of small order)")
    return X25519PublicKey.from_public_bytes(raw)


def private_key_text(key: X25519PrivateKey) -> str:
    """A private key for ``QM_SEALING_KEYS``: standard base64 of its 32 raw bytes."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


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
    raw = decode_base64(sealed, "a sealed value")
    head = 1 + KEY_BYTES + _NONCE_BYTES
    if len(raw) < head + 16 or raw[0] != SEAL_VERSION:
        raise Unsealable("not a version 1 sealed box")
    ephemeral_raw, nonce = raw[1 : 1 + KEY_BYTES], raw[1 + KEY_BYTES : head]
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
    plain = unseal(private, sealed, context)
    # bounded before parsing, as a request is: JSON nested deep enough exhausts a parser's stack
    if nesting_depth(plain) > MAX_NESTING:
        raise Unsealable(f"the sealed value is nested deeper than {MAX_NESTING} levels")
    try:
        return json.loads(plain)
    except (ValueError, RecursionError):
        raise Unsealable("the sealed value is not JSON") from None
