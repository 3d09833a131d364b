"""`qm dlt`: see what failed (ls, show) and redrive it safely (replay).

Every failure an operator can act on is one red line on stderr and exit code 2. A selection that
matches nothing is not a failure: it prints "nothing selected" and exits 0.

Every option is read as text and checked here (``_whole``, ``_rate``, ``_topic_name``, the
times in ``parse_time``), so a bad value is such a line too, never a usage box or a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Coroutine
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

from app.commands.common import out, print_json_lines
from app.commands.common import table as fold_table
from app.commands.dlt_report import print_report, report_json, when
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
from app.dlt.values import open_values
from app.settings import Settings, get_settings

dlt_app = typer.Typer(help="Dead-letter topics: list, show, replay.", no_args_is_help=True)

T = TypeVar("T")

# --- the filters show and replay share ---------------------------------------------------

MAX_OFFSET = 2**63 - 1  # Kafka offsets are signed 64-bit
MAX_PARTITION = 2**31 - 1  # and partitions signed 32-bit
MAX_RATE = 1_000_000.0
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

PartitionOpt = Annotated[
    list[str] | None,
    typer.Option("--partition", "-p", help="Only this partition (repeat for more)."),
]
FromOffsetOpt = Annotated[
    str | None, typer.Option("--from-offset", help="First offset, inclusive.")
]
ToOffsetOpt = Annotated[str | None, typer.Option("--to-offset", help="Last offset, inclusive.")]
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


def _whole(option: str, text: str | None, lowest: int, highest: int = MAX_OFFSET) -> int | None:
    """``text`` as a whole number from ``lowest`` to ``highest``; None stays None."""
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise DltError(f"{option} takes a whole number, not {text!r}") from None
    if not lowest <= value <= highest:
        raise DltError(f"{option} must be from {lowest} to {highest}, not {value}")
    return value


def _rate(text: str | None) -> float | None:
    """Records a second: a number above 0 and at most ``MAX_RATE``."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        raise DltError(f"--rate takes a number of records a second, not {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_RATE):
        raise DltError(f"--rate must be above 0 and at most {MAX_RATE:.0f}, not {text.strip()}")
    return value


def _topic_name(option: str, text: str | None) -> str | None:
    if text is not None and not TOPIC_NAME.match(text):
        raise DltError(f"{option} {text!r} is not a Kafka topic name (letters, digits, . _ -)")
    return text


def _selection(
    partition: list[str] | None,
    from_offset: str | None,
    to_offset: str | None,
    since: str | None,
    until: str | None,
    error_class: str | None,
    key: str | None,
) -> Selection:
    """The filters, each checked: a bad one is a ``DltError`` naming the option."""
    partitions = [_whole("--partition", p, 0, MAX_PARTITION) for p in partition or ()]
    first = _whole("--from-offset", from_offset, 0)
    last = _whole("--to-offset", to_offset, 0)
    if first is not None and last is not None and first > last:
        raise DltError("--from-offset is after --to-offset")
    since_ms = parse_time(since, option="--since") if since is not None else None
    until_ms = parse_time(until, option="--until") if until is not None else None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise DltError("--since is not before --until")
    if error_class is not None and not error_class.strip():
        raise DltError("--error-class is empty")
    return Selection(
        partitions=frozenset(p for p in partitions if p is not None) or None,
        from_offset=first,
        to_offset=last,
        since_ms=since_ms,
        until_ms=until_ms,
        error_class=error_class,
        key=key,
    )


# --- plumbing ----------------------------------------------------------------------------


def _out() -> Console:
    return out()


def _err() -> Console:
    return Console(stderr=True)


def _fail(exc: DltError) -> typer.Exit:
    """Print ``exc`` as one red line; the exit (code 2) to raise."""
    _err().print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
    return typer.Exit(2)


def _checked(check: Callable[[], T]) -> T:
    """``check()``; a ``DltError`` (a bad option) becomes one red line and exit code 2."""
    try:
        return check()
    except DltError as exc:
        raise _fail(exc) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine; a ``DltError`` becomes one red line and exit code 2."""
    try:
        return asyncio.run(coro)
    except DltError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        _err().print(
            "[yellow]interrupted (a replay records every copy the broker acknowledged; "
            "run it again to go on)[/]",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def _settings() -> Settings:
    return get_settings()


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
            when(s.oldest_ms) + _ago(s.oldest_ms),
            when(s.newest_ms) + _ago(s.newest_ms),
        )
    _out().print(table)


# --- show --------------------------------------------------------------------------------


def _letter_json(letter: DeadLetter, width: int) -> dict[str, Any]:
    return {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp": when(letter.timestamp_ms),
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
    limit: Annotated[str, typer.Option(help="Show at most this many records.")] = "50",
    width: Annotated[
        str, typer.Option(help="Cut keys, values and headers to this many characters.")
    ] = "200",
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON Lines (one record a line) instead of a table.")
    ] = False,
) -> None:
    """Records of a dead-letter topic with their headers; secrets redacted, values cut short.
    A value kept in PostgreSQL (too large for its dead letter) is read back from there."""
    settings = _settings()
    selection = _checked(
        lambda: _selection(partition, from_offset, to_offset, since, until, error_class, key)
    )
    most = _checked(lambda: _whole("--limit", limit, 1, 1_000_000)) or 1
    cut = _checked(lambda: _whole("--width", width, 10, 10_000_000)) or 10

    async def run() -> tuple[str, list[DeadLetter], bool]:
        found: list[DeadLetter] = []
        more = False
        async with open_reader(settings) as reader:
            name = await reader.resolve(topic)
            plan = await reader.plan(name, selection)
            async with aclosing(reader.select(plan, selection)) as letters:
                async for letter in letters:
                    if len(found) == most:
                        more = True
                        break
                    found.append(letter)
        async with open_values(settings) as values:
            found = await values.restore(found)
        return name, sorted_letters(found), more

    name, letters, more = _run(run())
    if as_json:
        for letter in letters:
            typer.echo(json.dumps(_letter_json(letter, cut), ensure_ascii=False))
        return
    if not letters:
        _out().print("nothing selected")
        return
    table = fold_table(
        "partition:offset", "timestamp", "key", "value", "headers", title=escape(name)
    )
    for letter in letters:
        headers = "\n".join(
            f"{escape(n)}: {escape(redact_header(n, v, cut))}" for n, v in letter.headers
        )
        table.add_row(
            f"{letter.partition}:{letter.offset}",
            when(letter.timestamp_ms),
            escape(redact_bytes(letter.key, cut) or "-"),
            escape(redact_bytes(letter.value, cut) or "-"),
            headers,
        )
    out = _out()
    out.print(table)
    if more:
        out.print(f"first {most} shown; narrow the filters or raise --limit to see more")


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
        str | None, typer.Option("--rate", help="At most this many records a second.")
    ] = None,
    again: Annotated[
        bool, typer.Option("--again", help="Also replay records an earlier run replayed.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="The report (with --dry-run, the plan) as one JSON object."),
    ] = False,
) -> None:
    """Send dead letters back to their original topic (or --to), each at most once unless --again.

    Handing a failed capture off again: mend the cause, then replay its dead letter, `qm dlt
    replay captures --key CAPTURE` (FAILED -> RECEIVED, as `qm captures retry CAPTURE` does). A
    capture no longer FAILED is left alone and reported as not replayed."""
    settings = _settings()
    selection = _checked(
        lambda: _selection(partition, from_offset, to_offset, since, until, error_class, key)
    )
    options = _checked(
        lambda: ReplayOptions(
            to=_topic_name("--to", to), dry_run=dry_run, again=again, rate=_rate(rate)
        )
    )

    async def run() -> ReplayReport:
        if dry_run:
            return await replay(settings, topic, selection, options)
        bar = _RichProgress("replaying")
        try:
            return await replay(settings, topic, selection, options, bar)
        finally:
            bar.close()

    report = _run(run())
    if as_json:
        typer.echo(json.dumps(report_json(report), ensure_ascii=False))
        return
    print_report(report)
