"""`qm seeds …`: the board entries collectors are handed, per site."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app.commands.common import (
    CommandServices,
    fail,
    in_transaction,
    known_site,
    out,
    print_json_lines,
)
from app.commands.common import table as fold_table
from app.core import seeds as seeding
from app.seed_files import Format, Refused, parse_rows, sniff_format, valid_seed_url
from app.store import Conn, Row, seeds
from schemas.states import SeedStatus

seeds_app = typer.Typer(help="Seeds: board entries handed out to collectors, due by interval.")
err = Console(stderr=True)
SHOWN_BAD_ROWS = 3  # in the one line an import answers; the count says how many more


@seeds_app.command("add")
def seeds_add(
    site: str,
    url: str,
    interval: Annotated[int, typer.Option(min=1, help="Seconds between crawls")] = 3600,
    priority: Annotated[int, typer.Option(help="Higher goes out first")] = 0,
) -> None:
    """Add one seed, due now."""
    try:
        valid_seed_url(url)
    except ValueError as exc:
        raise fail(str(exc)) from None

    async def work(conn: Conn) -> object:
        if not await seeds.site_exists(conn, site):
            return "no_site"
        return await seeds.add_seed(
            conn, site=site, url=url, interval_seconds=interval, priority=priority
        )

    row = in_transaction(work)
    if row == "no_site":
        raise fail(f"no site {site!r}; add it with `qm sites add`")
    if row is None:
        raise fail(f"{site} has that seed already (use `qm seeds import` to update it)")
    out().print(f"[green]seed added to {site}[/]")


def _lines(source: Iterator[str]) -> tuple[Format, Iterator[str]]:
    """The input's format (sniffed from its first non-blank line) and all its lines."""
    head: list[str] = []
    for line in source:
        head.append(line)
        if line.strip():
            break
    return sniff_format(head[-1] if head else ""), chain(head, source)


@seeds_app.command("import")
def seeds_import(
    site: str,
    file: Annotated[str, typer.Argument(help="CSV or JSON-lines file; - reads stdin")],
    interval: Annotated[int, typer.Option(min=1, help="For rows that name none")] = 3600,
    priority: Annotated[int, typer.Option(help="For rows that name none")] = 0,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Load the good rows when some cannot be read")
    ] = False,
) -> None:
    """Add or update a site's seeds by URL from CSV (url,interval_seconds,priority) or JSON lines.

    All or nothing, in one transaction: a row that cannot be read loads none, and one line names
    the first bad rows by line number and counts them. --skip-bad loads the others instead.
    """
    if file != "-" and not Path(file).is_file():
        raise fail(f"no file {file!r}")
    source = sys.stdin if file == "-" else open(file, encoding="utf-8", newline="")  # noqa: SIM115
    size = None if file == "-" else os.path.getsize(file)
    try:
        summary = asyncio.run(_import(site, source, size, interval, priority, skip_bad))
    except _BadRows as bad:
        raise fail(
            f"{'stdin' if file == '-' else file}: nothing imported, {_bad_rows(bad.summary.refused)}; fix them, or load the "
            f"other {bad.loaded} with --skip-bad"
        ) from None
    except UnicodeDecodeError:
        raise fail(f"{file} is not UTF-8 text") from None
    finally:
        if source is not sys.stdin:
            source.close()
    if summary is None:
        raise fail(f"no site {site!r}; add it with `qm sites add`")
    skipped = f", {_bad_rows(summary.refused)} skipped" if summary.refused else ""
    out().print(
        f"{site}: {summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged{skipped}",
        markup=False,
        highlight=False,
    )


class _BadRows(Exception):
    """Rows that could not be read, without --skip-bad: the import's transaction rolls back."""

    def __init__(self, summary: seeding.ImportSummary) -> None:
        super().__init__(f"{len(summary.refused)} bad rows")
        self.summary = summary
        self.loaded = summary.added + summary.updated + summary.unchanged


def _bad_rows(refused: list[Refused]) -> str:
    """'3 bad rows (line 3: why; line 6: why; …)': the count and the first few, for one line."""
    shown = "; ".join(f"line {bad.line}: {bad.reason}" for bad in refused[:SHOWN_BAD_ROWS])
    more = "; …" if len(refused) > SHOWN_BAD_ROWS else ""
    return f"{len(refused)} bad row{'s' if len(refused) > 1 else ''} ({shown}{more})"


class _Reading:
    """The input's lines, counting the characters read so far (the progress bar's measure)."""

    def __init__(self, source: IO[str]) -> None:
        self.source = source
        self.read = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.source:
            self.read += len(line)
            yield line


async def _import(
    site: str, source: IO[str], size: int | None, interval: int, priority: int, skip_bad: bool
) -> seeding.ImportSummary | None:
    """The import in one transaction, with a progress bar on stderr; None for no such site.
    Bad rows without ``skip_bad`` raise ``_BadRows`` (the transaction rolls back)."""
    reading = _Reading(source)
    fmt, lines = _lines(iter(reading))
    rows = parse_rows(lines, fmt, interval_seconds=interval, priority=priority)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rows]} rows"),
    )
    async with CommandServices().database() as db:
        with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"importing into {site}", total=size, rows=0)

            def advance(batch: int) -> None:
                rows_so_far = bar.tasks[0].fields["rows"] + batch
                bar.update(task, completed=reading.read, rows=rows_so_far)

            async with db.transaction() as conn:
                if not await seeds.site_exists(conn, site):
                    return None
                summary = await seeding.import_rows(conn, site, rows, progress=advance)
                if summary.refused and not skip_bad:
                    raise _BadRows(summary)
                return summary


@seeds_app.command("list")
def seeds_list(
    site: str,
    status: Annotated[SeedStatus | None, typer.Option(help="Only seeds in this status")] = None,
    due: Annotated[bool, typer.Option("--due", help="Only ACTIVE seeds due now")] = False,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines (one seed a line).")] = False,
) -> None:
    """A site's seeds in the order they go out (highest priority, longest due first)."""

    async def work(conn: Conn) -> list[Row]:
        await known_site(conn, site)
        return await seeds.list_seeds(conn, site, status=status, due=due, limit=limit)

    rows = in_transaction(work)
    if as_json:
        print_json_lines(rows)
        return
    table = fold_table(
        "id", "url", "status", "priority", "interval s", "next due", "holder", "failures", "reason"
    )
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["url"],
            str(row["status"]),
            str(row["priority"]),
            str(row["interval_seconds"]),
            row["next_due_at"].isoformat(timespec="seconds"),
            row["holder_job_id"] or "",
            str(row["failure_count"]),
            row["disabled_reason"] or row["last_error"] or "",
        )
    out().print(table)


def _move(site: str, seed: str, target: SeedStatus, reason: str | None = None) -> None:
    command = CommandServices()

    async def work(conn: Conn) -> Row | None:
        tx = command.tx(conn)
        row = await seeding.move_seed(tx, site=site, seed=seed, target=target, reason=reason)
        await tx.flush()
        return row

    row = command.in_transaction(work)
    if row is None:
        raise fail(f"{site} has no seed {seed!r} that can become {target}")
    out().print(f"seed {row['id']} of {site} is now {target}")


@seeds_app.command("disable")
def seeds_disable(
    site: str,
    seed: Annotated[str, typer.Argument(help="The seed's id or URL")],
    reason: Annotated[str, typer.Option()] = "operator",
) -> None:
    """Stop handing a seed out (a holder's result for it is then ignored)."""
    _move(site, seed, SeedStatus.DISABLED, reason)


@seeds_app.command("enable")
def seeds_enable(
    site: str, seed: Annotated[str, typer.Argument(help="The seed's id or URL")]
) -> None:
    """Hand a disabled seed out again, due now, its failures forgotten."""
    _move(site, seed, SeedStatus.ACTIVE)
