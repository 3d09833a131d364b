"""`qm audit`: operators prove from the event history that exclusivity held (docs/audit.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

audit_app = typer.Typer(
    help="Check the event history of qm.events for broken promises.", no_args_is_help=True
)


@audit_app.command("leases")
def leases(
    since: Annotated[
        str | None, typer.Option(help="From this record time: ISO 8601 or an age (2h, 7d)")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Before this record time: ISO 8601 or an age")
    ] = None,
    partition: Annotated[
        list[int] | None, typer.Option(help="Only this partition (repeat for more)")
    ] = None,
    from_offset: Annotated[int | None, typer.Option(min=0, help="First offset to read")] = None,
    to_offset: Annotated[int | None, typer.Option(min=0, help="Last offset to read")] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="Read events from this file (one JSON event a line) instead of Kafka"),
    ] = None,
    topic: Annotated[str | None, typer.Option(help="The events topic (default qm.events)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout")] = False,
    grace_seconds: Annotated[
        float, typer.Option(min=0, help="How long past its expiry a lease may stay unended")
    ] = 300.0,
    reorder_seconds: Annotated[
        float, typer.Option(min=0, help="How far out of database-clock order events may come")
    ] = 300.0,
    horizon_seconds: Annotated[
        float, typer.Option(min=0, help="How long ended leases and hand-offs are remembered")
    ] = 3_600.0,
) -> None:
    """Check every lease in the history: no account leased twice at once, tokens only growing,
    capacity never exceeded, every grant ended once, seeds and captures never taken twice.
    Exit 1 on any violation, 0 otherwise."""
    from rich.console import Console

    from app.audit.checker import Checker, Violation
    from app.audit.report import print_summary, print_violation
    from app.audit.sources import SourceError, Window, consumer, file_records, topic_records
    from app.commands.common import fail
    from app.dlt.reader import DltError, parse_time
    from app.settings import get_settings

    console = Console()
    if file is not None and (since or until or partition or from_offset or to_offset):
        raise fail("--file reads the whole file: no --since, --until, --partition or offsets")

    def found(violation: Violation) -> None:
        if not as_json:
            print_violation(console, violation)

    checker = Checker(
        reorder_seconds=reorder_seconds,
        grace_seconds=grace_seconds,
        horizon_seconds=horizon_seconds,
        on_violation=found,
    )
    try:
        if file is not None:
            for position, value in file_records(file):
                checker.feed(position, value)
        else:
            settings = get_settings()
            window = Window(
                partitions=frozenset(partition) if partition else None,
                from_offset=from_offset,
                to_offset=to_offset,
                since_ms=None if since is None else parse_time(since, option="--since"),
                until_ms=None if until is None else parse_time(until, option="--until"),
            )

            async def read() -> None:
                async with consumer(settings) as client:
                    async for position, value in topic_records(
                        settings, client, topic or settings.topic("events"), window
                    ):
                        checker.feed(position, value)

            asyncio.run(read())
    except (SourceError, DltError) as exc:
        raise fail(str(exc)) from None
    summary = checker.finish()
    if as_json:
        document = {
            "summary": summary.as_json(),
            "violations": [v.as_json() for v in checker.violations],
        }
        typer.echo(json.dumps(document, indent=2))
    else:
        print_summary(console, summary)
    raise typer.Exit(1 if sum(summary.violations.values()) else 0)
