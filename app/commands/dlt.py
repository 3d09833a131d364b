"""`qm dlt`: inspect and replay dead-letter topics (being built)."""

from __future__ import annotations

import typer

dlt_app = typer.Typer(help="Dead-letter topics: list, show, replay.")
