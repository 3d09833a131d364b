"""`qm`: the one entry point for operators: migrate, run processes, manage resources, inspect."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from app.bench import bench_app
from app.commands.accounts import accounts_app
from app.commands.asyncapi import asyncapi
from app.commands.audit import audit_app
from app.commands.captures import captures_app
from app.commands.dlt import dlt_app
from app.commands.domains import domains_app
from app.commands.failures import OneLineErrors, quiet_kafka_client
from app.commands.jobs import jobs_app
from app.commands.keys import keys_app
from app.commands.outbox import outbox_app
from app.commands.seeds import seeds_app
from app.commands.sessions import sessions_app
from app.commands.sites import sites_app
from app.commands.top import top
from app.logs import configure_logging
from app.root import PROCESSES, run_processes
from app.settings import get_settings

app = typer.Typer(
    help="Quartermaster: accounts, sessions, seeds and capture handoff for collectors.",
    cls=OneLineErrors,  # every failure an operator can fix is one line and exit code 2
    rich_markup_mode=None,  # plain help: no boxes cut when piped, no <bool> after flags
)
app.add_typer(bench_app, name="bench")
app.add_typer(dlt_app, name="dlt")
app.add_typer(sites_app, name="sites")
app.add_typer(accounts_app, name="accounts")
app.add_typer(jobs_app, name="jobs")
app.command()(top)
app.add_typer(domains_app, name="domains")
app.add_typer(seeds_app, name="seeds")
app.add_typer(sessions_app, name="sessions")
app.command("asyncapi")(asyncapi)
app.add_typer(captures_app, name="captures")
app.add_typer(keys_app, name="keys")
app.add_typer(outbox_app, name="outbox")
app.add_typer(audit_app, name="audit")
console = Console()
err = Console(stderr=True)


@app.callback()
def _setup() -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


@app.command()
def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply database migrations."""
    from app.db.engine import connect_args
    from app.db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url, revision, connect_args(settings))
    console.print(f"[green]database migrated to {revision}[/]")


@app.command("topics")
def topics_create(
    acls: Annotated[
        bool,
        typer.Option(
            "--acls", help="Print the broker's ACL set as kafka-acls commands instead (no change)"
        ),
    ] = False,
    collector: Annotated[
        list[str] | None,
        typer.Option(help="A collector principal (SASL user) for --acls; repeat for several"),
    ] = None,
) -> None:
    """Create every Kafka topic Quartermaster uses (existing ones are left alone)."""
    if acls:
        from app.kafka_acls import COLLECTOR, acl_commands, acl_set

        settings = get_settings()
        try:
            grants = acl_set(settings, collectors=collector or [COLLECTOR])
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--collector") from None
        for line in acl_commands(grants, settings.kafka_bootstrap_servers):
            print(line)
        return
    from app.kafka import ensure_topics

    quiet_kafka_client()  # an unreachable broker is the command's one line, not a log per try
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
def dev(
    fresh: Annotated[bool, typer.Option(help="Delete the kept state (.qm-dev/) first")] = False,
    demo: Annotated[bool, typer.Option(help="Add a demo site with three accounts")] = False,
    containers: Annotated[
        bool, typer.Option(help="Kafka and PostgreSQL in containers (Docker or Podman)")
    ] = False,
) -> None:
    """Everything on embedded services (no Java needed), state kept in .qm-dev/, then `run all`."""
    from app.devstack.dev import run_dev

    # a service that cannot start, or a folder whose stack runs, is one red line (main)
    run_dev(fresh=fresh, demo=demo, containers=containers)


def main() -> None:
    """Console-script entry point (failures are answered by ``OneLineErrors``)."""
    app()
