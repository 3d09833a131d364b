"""`qm dlt`: see what failed (ls, show) and redrive it safely (replay).

Every failure an operator can act on is one red line on stderr and exit code 2. A selection that
matches nothing is not a failure: it prints "nothing selected" and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from contextlib import aclosing
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from app.commands.common import print_json_lines
from app.commands.common import table as fold_table
from app.dlt import redact_bytes, redact_header
from app.dlt.reader import (
    DeadLetter,
    DltError,
    Selection,
    TopicSummary,
    open_reader,
    parse_time,
    sorted_letters,
    summarize,
)
from app.dlt.replay import ReplayOptions, ReplayReport, replay
from app.settings import Settings, get_settings

dlt_app = typer.Typer(help="Dead-letter topics: list, show, replay.", no_args_is_help=True)

T = TypeVar("T")
DRY_RUN_ROWS = 200

# --- the filters show and replay share ---------------------------------------------------

PartitionOpt = Annotated[
    list[int] | None,
    typer.Option("--partition", "-p", min=0, help="Only this partition (repeat for more)."),
]
FromOffsetOpt = Annotated[
    int | None, typer.Option("--from-offset", min=0, help="First offset, inclusive.")
]
ToOffsetOpt = Annotated[
    int | None, typer.Option("--to-offset", min=0, help="Last offset, inclusive.")
]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since", help="Records stamped at or after: ISO 8601 (UTC if no zone) or an age (2h, 7d)."
    ),
]
UntilOpt = Annotated[
    str | None, typer.Option("--until", help="Records stamped before: ISO 8601 or an age.")
]
ErrorClassOpt = Annotated[
    str | None,
    typer.Option("--error-class", help="qm.dlt.error_class: the full name or its last part."),
]
KeyOpt = Annotated[str | None, typer.Option("--key", help="Records with exactly this key.")]
TopicArg = Annotated[
    str, typer.Argument(help="Dead-letter topic, e.g. qm.requests.dlt or requests.")
]


def _selection(
    partition: list[int] | None,
    from_offset: int | None,
    to_offset: int | None,
    since: str | None,
    until: str | None,
    error_class: str | None,
    key: str | None,
) -> Selection:
    if from_offset is not None and to_offset is not None and from_offset > to_offset:
        raise DltError("--from-offset is after --to-offset")
    since_ms = parse_time(since) if since else None
    until_ms = parse_time(until) if until else None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise DltError("--since is not before --until")
    return Selection(
        partitions=frozenset(partition) if partition else None,
        from_offset=from_offset,
        to_offset=to_offset,
        since_ms=since_ms,
        until_ms=until_ms,
        error_class=error_class,
        key=key,
    )


# --- plumbing ----------------------------------------------------------------------------


def _out() -> Console:
    return Console()


def _err() -> Console:
    return Console(stderr=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine; a ``DltError`` becomes one red line and exit code 2."""
    try:
        return asyncio.run(coro)
    except DltError as exc:
        _err().print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _err().print(
            "[yellow]interrupted (a replay records every copy the broker acknowledged; "
            "run it again to go on)[/]",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def _settings() -> Settings:
    return get_settings()


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(ms: int | None) -> str:
    if ms is None:
        return ""
    seconds = max(0, int(datetime.now(UTC).timestamp() - ms / 1000))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f" ({seconds // size}{unit} ago)"
    return f" ({seconds}s ago)"


@dlt_app.callback()
def _quiet_clients() -> None:
    # the Kafka client logs every failed connection attempt; the command says it once, in red
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


# --- ls ----------------------------------------------------------------------------------


@dlt_app.command("ls")
def list_topics(
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines (one topic a line).")] = False,
) -> None:
    """Dead-letter topics under the topic prefix: records by error class and their age range."""
    settings = _settings()

    async def run() -> list[TopicSummary]:
        async with open_reader(settings) as reader:
            return await summarize(reader)

    summaries = _run(run())
    if as_json:
        print_json_lines(
            {**asdict(s), "by_error_class": dict(s.by_error_class.most_common())} for s in summaries
        )
        return
    if not summaries:
        _out().print(f"no dead-letter topics under the prefix {escape(settings.topic_prefix)!r}")
        return
    table = fold_table("topic", "partitions", "records", "by error class", "oldest", "newest")
    for s in summaries:
        classes = "\n".join(
            f"{count:>6}  {escape(name)}" for name, count in s.by_error_class.most_common()
        )
        table.add_row(
            escape(s.topic),
            str(s.partitions),
            str(s.records),
            classes or "-",
            _when(s.oldest_ms) + _ago(s.oldest_ms),
            _when(s.newest_ms) + _ago(s.newest_ms),
        )
    _out().print(table)


# --- show --------------------------------------------------------------------------------


def _letter_json(letter: DeadLetter, width: int) -> dict[str, Any]:
    return {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp": _when(letter.timestamp_ms),
        "timestamp_ms": letter.timestamp_ms,
        "key": redact_bytes(letter.key, width),
        "value": redact_bytes(letter.value, width),
        "headers": [[name, redact_header(name, value, width)] for name, value in letter.headers],
    }


@dlt_app.command()
def show(
    topic: TopicArg,
    partition: PartitionOpt = None,
    from_offset: FromOffsetOpt = None,
    to_offset: ToOffsetOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    error_class: ErrorClassOpt = None,
    key: KeyOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many records.")] = 50,
    width: Annotated[
        int, typer.Option(min=10, help="Cut keys, values and headers to this many characters.")
    ] = 200,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON Lines (one record a line) instead of a table.")
    ] = False,
) -> None:
    """Records of a dead-letter topic with their headers; secrets redacted, values cut short."""
    settings = _settings()

    async def run() -> tuple[str, list[DeadLetter], bool]:
        selection = _selection(partition, from_offset, to_offset, since, until, error_class, key)
        found: list[DeadLetter] = []
        async with open_reader(settings) as reader:
            name = await reader.resolve(topic)
            plan = await reader.plan(name, selection)
            async with aclosing(reader.select(plan, selection)) as letters:
                async for letter in letters:
                    if len(found) == limit:
                        return name, sorted_letters(found), True
                    found.append(letter)
        return name, sorted_letters(found), False

    name, letters, more = _run(run())
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(_letter_json(letter, width), ensure_ascii=False))
        return
    if not letters:
        _out().print("nothing selected")
        return
    table = fold_table(
        "partition:offset", "timestamp", "key", "value", "headers", title=escape(name)
    )
    for letter in letters:
        headers = "\n".join(
            f"{escape(n)}: {escape(redact_header(n, v, width))}" for n, v in letter.headers
        )
        table.add_row(
            f"{letter.partition}:{letter.offset}",
            _when(letter.timestamp_ms),
            escape(redact_bytes(letter.key, width) or "-"),
            escape(redact_bytes(letter.value, width) or "-"),
            headers,
        )
    out = _out()
    out.print(table)
    if more:
        out.print(f"first {limit} shown; narrow the filters or raise --limit to see more")


# --- replay ------------------------------------------------------------------------------


class _RichProgress:
    """The replay's progress bar on stderr (only on a terminal): offsets scanned, copies sent."""

    COLUMNS = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("scanned, {task.fields[sent]} sent"),
        TimeElapsedColumn(),
    )

    def __init__(self, description: str) -> None:
        console = _err()
        self._progress = Progress(*self.COLUMNS, console=console, transient=True)
        self._enabled = console.is_terminal
        self._description = description
        self._task: TaskID | None = None

    def start(self, total: int) -> None:
        if self._enabled:
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=total, sent=0)

    def advance(self, scanned: int, sent: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=scanned, sent=sent)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


def _print_dry_run(report: ReplayReport) -> None:
    out = _out()
    table = fold_table(
        "partition:offset", "timestamp", "key", "error class", "to", title="would replay"
    )
    for letter, target in report.planned[:DRY_RUN_ROWS]:
        table.add_row(
            f"{letter.partition}:{letter.offset}",
            _when(letter.timestamp_ms),
            escape(redact_bytes(letter.key, 60) or "-"),
            escape(letter.error_class or "-"),
            escape(target),
        )
    out.print(table)
    if len(report.planned) > DRY_RUN_ROWS:
        out.print(f"… and {len(report.planned) - DRY_RUN_ROWS} more")
    out.print(
        f"dry run: {report.selected} selected, {len(report.planned)} would be replayed, "
        f"{report.already_replayed} skipped as already replayed; nothing was sent"
    )


@dlt_app.command("replay")
def replay_command(
    topic: TopicArg,
    partition: PartitionOpt = None,
    from_offset: FromOffsetOpt = None,
    to_offset: ToOffsetOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    error_class: ErrorClassOpt = None,
    key: KeyOpt = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Send here instead of each record's original topic.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would go; send nothing.")
    ] = False,
    rate: Annotated[
        float | None, typer.Option("--rate", min=0.001, help="At most this many records a second.")
    ] = None,
    again: Annotated[
        bool, typer.Option("--again", help="Also replay records an earlier run replayed.")
    ] = False,
) -> None:
    """Send dead letters back to their original topic (or --to), each at most once unless --again."""
    settings = _settings()
    options = ReplayOptions(to=to, dry_run=dry_run, again=again, rate=rate)

    async def run() -> ReplayReport:
        selection = _selection(partition, from_offset, to_offset, since, until, error_class, key)
        if dry_run:
            return await replay(settings, topic, selection, options)
        bar = _RichProgress("replaying")
        try:
            return await replay(settings, topic, selection, options, bar)
        finally:
            bar.close()

    report = _run(run())
    out = _out()
    if report.selected == 0:
        out.print("nothing selected")
        return
    if report.dry_run:
        _print_dry_run(report)
        return
    if report.replayed:
        targets = ", ".join(f"{escape(t)} ({n})" for t, n in report.targets.most_common())
        sent = f"[green]{report.replayed} replayed[/] to {targets}"
    else:
        sent = "0 replayed"
    out.print(
        f"{report.selected} selected, {sent}, "
        f"{report.already_replayed} skipped as already replayed",
        highlight=False,
    )
    if report.already_replayed and not report.replayed:
        out.print("every selected record was replayed before; --again replays them anyway")
    if report.raced:
        out.print(
            f"[yellow]{report.raced} of them were also replayed by another run meanwhile "
            "(harmless: requests are idempotent)[/]"
        )
