"""The ``qm`` command: Quartermaster's CLI, or one line saying to install the server when only
the client (``pip install quartermaster``) is installed."""

from __future__ import annotations

import sys

from app.installs import OURS, SERVER


def main() -> None:
    """Run ``app.cli``; without the server's dependencies, say which install brings them."""
    try:
        from app.cli import main as cli
    except ModuleNotFoundError as missing:
        # one of ours missing is a bug to show whole; a library missing is the client install
        if missing.name is None or missing.name.split(".")[0] in OURS:
            raise
        sys.exit(
            f"qm runs Quartermaster's server: pip install '{SERVER}' (missing: {missing.name})"
        )
    cli()
