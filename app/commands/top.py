"""`qm top`: a live view of every site, the outbox, dead letters and reaper repairs.

It only reads: the database (sites, accounts, jobs, grants, outbox) once a refresh, and the broker
(the dead-letter topics' offsets) from a task of its own, so a slow broker never stalls the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import DBAPIError

from app.commands.common import CommandServices, fail, out, plain
from app.commands.failures import explain, quiet_kafka_client
from app.dlt.reader import DltError
from app.overview import (
    REPAIR_WINDOW_MINUTES,
    DeadLetters,
    Snapshot,
    count_dead_letters,
    read_snapshot,
    watch_dead_letters,
)
from app.settings import Settings, get_settings
from app.store import Database, Row
from app.store.accounts import HEALTH_STATES


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def health_cell(health: dict[str, int]) -> Text:
    """'3 healthy, 1 at_risk': the site's accounts by health, those at risk or worse in red."""
    order = {state: n for n, state in enumerate(HEALTH_STATES)}
    parts = sorted(health.items(), key=lambda item: order.get(item[0], len(order)))
    cell = Text()
    for n, (state, count) in enumerate(parts):
        bad = state in ("at_risk", "failing", "retired")
        cell.append(("" if n == 0 else ", ") + f"{count} {state}", style="red" if bad else "")
    return cell


def _sites_table(sites: list[Row]) -> Table:
    grid = Table(title="sites", title_justify="left", expand=False)
    columns = ("site", "running", "waiting", "oldest waiter", "ready", "resting", "using",
               "blocked", "inactive", "grants/min", "health")  # fmt: skip
    for name in columns:
        grid.add_column(name, overflow="fold", justify="left" if name == "site" else "right")
    for s in sites:
        full = s["running"] >= s["capacity"]
        grid.add_row(
            s["slug"],
            Text(f"{s['running']}/{s['capacity']}", style="bold red" if full else ""),
            str(s["waiting"]),
            _age(s["oldest_wait_seconds"]),
            str(s["accounts_ready"]),
            str(s["accounts_resting"]),
            str(s["accounts_using"]),
            Text(str(s["accounts_blocked"]), style="red" if s["accounts_blocked"] else ""),
            str(s["accounts_inactive"]),
            str(s["grants_last_minute"]),
            health_cell(s["health"]),
        )
    if not sites:
        grid.add_row("(no sites: `qm sites add`)", *[""] * (len(columns) - 1))
    return grid


def _side_tables(snapshot: Snapshot, dead: DeadLetters) -> list[Table]:
    box = Table(title="outbox", title_justify="left")
    box.add_column("rows waiting", justify="right")
    box.add_column("lag (oldest)", justify="right")
    box.add_row(str(snapshot.backlog.rows), _age(snapshot.backlog.oldest_age_seconds))

    letters = Table(title="dead letters", title_justify="left")
    letters.add_column("topic", overflow="fold")
    letters.add_column("records", justify="right")
    if dead.error is not None:
        letters.add_row(Text(dead.error, style="yellow"), "")
    for topic, count in sorted(dead.per_topic.items()):
        letters.add_row(topic, Text(str(count), style="red" if count else ""))
    if dead.error is None and not dead.per_topic:
        letters.add_row("(no dead-letter topics)", "")

    repairs = Table(title=f"reaper repairs, last {REPAIR_WINDOW_MINUTES} min", title_justify="left")
    for name in ("leases expired", "waits timed out", "attempts exhausted"):
        repairs.add_column(name, justify="right")
    r = snapshot.repairs
    repairs.add_row(
        str(r["leases_expired"]), str(r["waits_timed_out"]), str(r["attempts_exhausted"])
    )
    return [box, letters, repairs]


def render(snapshot: Snapshot, dead: DeadLetters, problem: str | None = None) -> RenderableType:
    """The whole view for one refresh."""
    header = Text.assemble(
        ("qm top", "bold"),
        f"  {snapshot.at.isoformat(timespec='seconds')}  (q or Ctrl-C quits)",
    )
    parts: list[RenderableType] = [header]
    if problem is not None:
        parts.append(Text(problem, style="bold red"))
    parts.append(_sites_table(snapshot.sites))
    parts.extend(_side_tables(snapshot, dead))
    return Group(*parts)


@contextlib.contextmanager
def keys() -> Iterator[int | None]:
    """stdin in cbreak mode (one key at a time, Ctrl-C still interrupts); None if not a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_top(settings: Settings, interval: float, once: bool, as_json: bool = False) -> None:
    async with CommandServices(settings).database() as db:
        await _show(db, settings, interval, once, as_json)


def snapshot_json(snapshot: Snapshot, dead: DeadLetters) -> dict[str, object]:
    """One view as JSON: what the tables show, with durations in seconds."""
    return {
        "at": plain(snapshot.at),
        "sites": [{key: plain(site[key]) for key in site} for site in snapshot.sites],
        "outbox": {
            "rows_waiting": snapshot.backlog.rows,
            "oldest_age_seconds": snapshot.backlog.oldest_age_seconds,
        },
        "dead_letters": dict(sorted(dead.per_topic.items())),
        "reaper_repairs": {
            "minutes": REPAIR_WINDOW_MINUTES,
            **{key: plain(snapshot.repairs[key]) for key in snapshot.repairs},
        },
    }


async def _show(
    db: Database, settings: Settings, interval: float, once: bool, as_json: bool
) -> None:
    """Print one view, or keep the live view until q or Ctrl-C."""
    dead = DeadLetters()
    snapshot = await read_snapshot(db)  # an unreachable database is the command's one-line error
    if once:
        try:
            dead = DeadLetters(await count_dead_letters(settings), None)
        except DltError as exc:  # a view without its dead letters would read as "none"
            raise fail(str(exc)) from None
        if as_json:
            typer.echo(json.dumps(snapshot_json(snapshot, dead)))
        else:
            out().print(render(snapshot, dead))
        return
    quit_pressed = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C quits as q does, by the event: no cancellation for a refresh to swallow
    loop.add_signal_handler(signal.SIGINT, quit_pressed.set)
    broker = asyncio.create_task(watch_dead_letters(settings, dead, interval))
    try:
        with keys() as fd, Live(render(snapshot, dead), auto_refresh=False, screen=False) as live:
            if fd is not None:
                loop.add_reader(fd, _on_key, fd, quit_pressed)
            while not quit_pressed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await quit_pressed.wait()
                problem = None
                try:
                    snapshot = await read_snapshot(db)
                except (DBAPIError, OSError) as exc:  # shown; the next refresh tries again
                    problem = explain(exc)
                live.update(render(snapshot, dead, problem), refresh=True)
            if fd is not None:
                loop.remove_reader(fd)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        broker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await broker


def _on_key(fd: int, quit_pressed: asyncio.Event) -> None:
    if os.read(fd, 32).lower().startswith(b"q"):
        quit_pressed.set()


def top(
    interval: Annotated[
        float, typer.Option(min=0.2, max=60, help="Seconds between refreshes")
    ] = 1.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print one view and exit (for scripts and pipes)")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one view as one JSON object and exit (--once)")
    ] = False,
) -> None:
    """A live view: per site capacity, running, waiting, accounts by state, the oldest waiter's
    age and grants per minute; the outbox backlog and lag; dead letters per topic; reaper repairs.
    Reads the database and the broker only. Quits on q or Ctrl-C."""
    quiet_kafka_client()  # the view shows a broker outage; log lines would tear it
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_top(get_settings(), interval, once or as_json, as_json))
