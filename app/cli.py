"""`qm`: the one entry point for operators: migrate, run processes, manage resources, inspect."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from app.bench import bench_app
from app.commands.captures import captures_app
from app.commands.dlt import dlt_app
from app.commands.domains import domains_app
from app.commands.resources import accounts_app, sites_app
from app.devstack import ServiceUnavailable
from app.dlt import redact
from app.logs import configure_logging
from app.settings import get_settings

app = typer.Typer(
    help="Quartermaster: accounts, sessions, seeds and capture handoff for collectors."
)
app.add_typer(bench_app, name="bench")
app.add_typer(dlt_app, name="dlt")
app.add_typer(sites_app, name="sites")
app.add_typer(accounts_app, name="accounts")
app.add_typer(domains_app, name="domains")
app.add_typer(captures_app, name="captures")
console = Console()
err = Console(stderr=True)

PROCESSES = ("worker", "relay", "reaper", "handoff")


@app.callback()
def _setup() -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


@app.command()
def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply database migrations."""
    from app.db.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    console.print(f"[green]database migrated to {revision}[/]")


@app.command("topics")
def topics_create() -> None:
    """Create every Kafka topic Quartermaster uses (existing ones are left alone)."""
    from app.kafka import ensure_topics

    created = asyncio.run(ensure_topics(get_settings()))
    console.print(f"created {len(created)} topics: {', '.join(created) or '-'}")


@app.command()
def schema(
    out: Annotated[
        str | None, typer.Option(help="Directory to write one <name>.schema.json per message kind")
    ] = None,
) -> None:
    """Export the Kafka contract (requests, replies, events) as JSON Schema."""
    import json
    from pathlib import Path

    from schemas.messages import json_schemas

    schemas = json_schemas()
    if out is None:
        console.print_json(json.dumps(schemas))
        return
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for name, document in schemas.items():
        (target / f"{name}.schema.json").write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"wrote {len(schemas)} schemas to {target}")


@app.command()
def run(
    process: Annotated[str, typer.Argument(help=f"all, or one of: {', '.join(PROCESSES)}")] = "all",
) -> None:
    """Run one process, or `all` of them in this OS process."""
    from app.runtime import run_processes

    names = list(PROCESSES) if process == "all" else [process]
    if any(name not in PROCESSES for name in names):
        err.print(f"[red]unknown process {process!r}[/]; choose all, {', '.join(PROCESSES)}")
        raise typer.Exit(2)
    asyncio.run(run_processes(get_settings(), names))


@app.command()
def worker() -> None:
    """Run the claim worker (same as `qm run worker`)."""
    run("worker")


@app.command()
def relay() -> None:
    """Run the outbox relay (same as `qm run relay`)."""
    run("relay")


@app.command()
def reaper() -> None:
    """Run the reapers (same as `qm run reaper`)."""
    run("reaper")


@app.command()
def dev() -> None:
    """Everything on embedded services: PostgreSQL, the in-memory broker, then `run all`."""
    from app.devstack.dev import run_dev

    run_dev()  # a service that cannot start is one red line (main)


def main() -> None:
    """Console-script entry point: operator mistakes and unreachable services get one red line."""
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from app.crypto import MissingKey

    try:
        app()
    except (ServiceUnavailable, MissingKey, ArgumentError) as exc:
        err.print(f"[red]{exc}[/]")
        raise SystemExit(2) from None
    except (DBAPIError, OSError) as exc:
        err.print(
            f"[red]the database or broker cannot be reached: {type(exc).__name__}: {redact(str(exc))}[/]"
        )
        raise SystemExit(2) from None
