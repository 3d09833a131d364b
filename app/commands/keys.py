"""`qm keys new`: a fresh X25519 key for ``QM_SEALING_KEYS`` (docs/security.md)."""

from __future__ import annotations

import typer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.console import Console

from app.crypto import private_key_text, public_key_text

keys_app = typer.Typer(help="Keys: make a sealing key.")
console = Console(stderr=True)


@keys_app.command("new")
def keys_new() -> None:
    """Print a new private sealing key on stdout (its public half on stderr).

    Put it first in QM_SEALING_KEYS to rotate; keep the old key after it until no collector
    still holds a grant that announced it.
    """
    key = X25519PrivateKey.generate()
    typer.echo(private_key_text(key))
    console.print(f"public key (announced to collectors as upload_key): {public_key_text(key)}")
