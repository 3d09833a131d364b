"""`qm`: the one entry point for operators: migrate, run processes, manage resources, inspect."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from app.commands.failures import OneLineErrors
from app.commands.lazy import Lazy, LazyGroup

if TYPE_CHECKING:
    from rich.console import Console

# `qm run`'s processes by name, as app.root.PROCESSES has them (tests/unit/test_processes.py
# keeps the two equal): importing app.root costs what `qm --help` must not pay
PROCESS_NAMES = ("worker", "relay", "reaper", "handoff", "alerts", "auditor", "console")


class Qm(LazyGroup, OneLineErrors):
    """`qm`: one line and exit code 2 for every failure an operator can fix, and each command
    group imported when it is used, so that a command pays only for what it runs."""

    lazy = {
        "top": Lazy(
            "app.commands.top:top",
            "A live view: per site capacity, running, waiting, accounts by state, the oldest "
            "waiter's age and grants per minute; the outbox backlog and lag; dead letters per "
            "topic; reaper repairs. Reads the database and the broker only. Quits on q or Ctrl-C.",
        ),
        "asyncapi": Lazy(
            "app.commands.asyncapi:asyncapi",
            "Export the Kafka contract (every topic and message) as an AsyncAPI 3 document.",
        ),
        "bench": Lazy(
            "app.bench:bench_app",
            "Benchmarks against a real Kafka and a real PostgreSQL; they print numbers.",
        ),
        "dlt": Lazy("app.commands.dlt:dlt_app", "Dead-letter topics: list, show, replay."),
        "sites": Lazy("app.commands.sites:sites_app", "Sites: capacity, leases, cooldowns."),
        "accounts": Lazy(
            "app.commands.accounts:accounts_app",
            "Accounts of a site; secrets are read from a prompt or stdin, never echoed.",
        ),
        "proxies": Lazy(
            "app.commands.proxies:proxies_app",
            "Proxies of a site, pinned to its accounts (one each, until the proxy fails).",
        ),
        "jobs": Lazy("app.commands.jobs:jobs_app", "Jobs: what runs, what waits and why."),
        "domains": Lazy(
            "app.commands.domains:domains_app",
            "Domain rewrites: when a site moves hosts, the URLs handed out follow (chains resolve).",
        ),
        "seeds": Lazy(
            "app.commands.seeds:seeds_app",
            "Seeds: board entries handed out to collectors, due by interval.",
        ),
        "sessions": Lazy(
            "app.commands.sessions:sessions_app",
            "Browser sessions of accounts: show (never values), clear.",
        ),
        "captures": Lazy(
            "app.commands.captures:captures_app",
            "Captures: their handoff downstream, failures and retries.",
        ),
        "keys": Lazy(
            "app.commands.keys:keys_app",
            "Keys: make a sealing key; rotate and check the secrets sealed at rest.",
        ),
        "outbox": Lazy(
            "app.commands.outbox:outbox_app",
            "Outbox rows the relay gave up on (parked), keeps failing (refused) or dead-lettered "
            "but not yet published: list them, send them again.",
        ),
        "console": Lazy(
            "app.commands.console:console_app",
            "The web console (`qm run console`): make a line of its users file.",
        ),
        "audit": Lazy(
            "app.commands.audit:audit_app",
            "Check the event history of qm.events for broken promises.",
        ),
    }


app = typer.Typer(
    help="Quartermaster: accounts, sessions, seeds and capture handoff for collectors.",
    cls=Qm,
    rich_markup_mode=None,  # plain help: no boxes cut when piped, no <bool> after flags
)


def console() -> Console:
    """Standard output, for what a command prints."""
    from rich.console import Console

    return Console()


def configure_logging(fmt: str, level: str) -> None:
    """structlog set up for a command (app.logs), imported only when a command runs."""
    from app.logs import configure_logging

    configure_logging(fmt, level)


@app.callback()
def _setup() -> None:
    from app.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError:
        if "--help" in sys.argv[1:]:  # help needs no settings: a bad one is said when one runs
            return
        raise
    configure_logging(settings.log_format, settings.log_level)


@app.command()
def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply database migrations."""
    from app.db.engine import connect_args
    from app.db.migrate import upgrade
    from app.settings import get_settings

    settings = get_settings()
    upgrade(settings.database_url, revision, connect_args(settings))
    console().print(f"[green]database migrated to {revision}[/]")


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
        typer.Option(
            metavar="NAME", help="A collector principal (SASL user) for --acls; repeat for several"
        ),
    ] = None,
) -> None:
    """Create every Kafka topic Quartermaster uses (existing ones are left alone)."""
    import asyncio

    from app.commands.failures import quiet_kafka_client
    from app.settings import get_settings

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
    console().print(f"created {len(created)} topics: {', '.join(created) or '-'}")


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
        console().print_json(json.dumps(schemas))
        return
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for name, document in schemas.items():
        (target / f"{name}.schema.json").write_text(json.dumps(document, indent=2) + "\n")
    console().print(f"wrote {len(schemas)} schemas to {target}")


@app.command()
def run(
    process: Annotated[
        str, typer.Argument(help=f"all, or one of: {', '.join(PROCESS_NAMES)}")
    ] = "all",
) -> None:
    """Run one process, or `all` of them in this OS process (`console` is the web console,
    docs/console.md)."""
    import asyncio

    from app.commands.failures import say
    from app.root import PROCESSES, run_processes
    from app.settings import get_settings

    names = list(PROCESSES) if process == "all" else [process]
    if any(name not in PROCESSES for name in names):
        say(f"unknown process {process!r}; choose all, {', '.join(PROCESSES)}")
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
