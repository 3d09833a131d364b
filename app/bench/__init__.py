"""`qm bench`: benchmarks that print their numbers, run against real services."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks against a real Kafka and a real PostgreSQL; they print numbers."
)

from app.bench.audit import bench_audit  # noqa: E402 - registered after bench_app exists
from app.bench.captures import bench_captures  # noqa: E402
from app.bench.lease import bench_lease  # noqa: E402
from app.bench.relay import bench_relay  # noqa: E402
from app.bench.seeds import bench_seeds  # noqa: E402

bench_app.command("relay")(bench_relay)
bench_app.command("lease")(bench_lease)
bench_app.command("captures")(bench_captures)
bench_app.command("seeds")(bench_seeds)
bench_app.command("audit")(bench_audit)
