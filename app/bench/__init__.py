"""`qm bench`: benchmarks that print their numbers, run against real services."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks against a real Kafka and a real PostgreSQL; they print numbers."
)
