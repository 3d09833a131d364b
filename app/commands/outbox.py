"""`qm outbox ls|retry`: the outbox rows the relay gave up on or keeps failing, listed and sent
again (docs/dead-letters.md, "Outbox rows an operator looks after")."""

from __future__ import annotations

import re
from collections import Counter
from typing import Annotated

import typer
from rich.markup import escape

from app.commands.common import fail, in_transaction, out, print_json_lines, table, when
from app.dlt import redact_bytes
from app.settings import Settings, get_settings
from app.store import Conn, Row
from app.store.outbox_rows import DEAD_LETTER, PARKED, REFUSED, STATES, retry_rows, stuck_rows

outbox_app = typer.Typer(
    help="Outbox rows the relay gave up on (parked), keeps failing (refused) or dead-lettered "
    "but not yet published: list them, send them again.",
    no_args_is_help=True,
)

TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_ID = 2**63 - 1
MAX_LIMIT = 100_000

Json = Annotated[bool, typer.Option("--json", help="JSON Lines (one row a line).")]
TopicOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--topic",
        "-t",
        metavar="TOPIC",
        help="Rows going to this topic, or (a dead letter) that were going there; with or "
        "without the topic prefix. Repeat for more.",
    ),
]


class _Unmatched(Exception):
    """A retry that matched nothing, or not every id asked for: nothing was changed."""


def _topics(settings: Settings, names: list[str] | None) -> list[str] | None:
    """Each name as given and with the topic prefix, checked; None when none was given."""
    if not names:
        return None
    chosen: list[str] = []
    for name in names:
        if not TOPIC_NAME.fullmatch(name):
            raise fail(f"--topic {name!r} is not a Kafka topic name (letters, digits, . _ -)")
        chosen.append(name)
        if not name.startswith(settings.topic_prefix):
            chosen.append(settings.topic(name))
    return chosen


def _ids(texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        value = text.strip()
        if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_ID:
            raise fail(
                f"{text!r} is not an outbox row id (a whole number, as `qm outbox ls` shows)"
            )
        ids.append(int(value))
    return ids


def _error_class(row: Row) -> str:
    name = row["error_class"] or ""
    return name.rsplit(".", 1)[-1]


def _shown(row: Row) -> dict[str, object]:
    return {
        "id": row["id"],
        "state": row["state"],
        "topic": row["topic"],
        "original_topic": row["original_topic"],
        "partition": row["partition"],
        "shard": row["shard"],
        "attempts": row["attempts"],
        "attempts_before_dead_letter": row["dlt_attempts"],
        "error_class": row["error_class"],
        "key": redact_bytes(None if row["key"] is None else bytes(row["key"]), 200),
        "value_bytes": row["value_bytes"],
        "created_at": row["created_at"],
        "parked_at": row["parked_at"],
    }


@outbox_app.command("ls")
def outbox_ls(
    topic: TopicOpt = None,
    parked: Annotated[
        bool, typer.Option("--parked", help="Parked rows: refused for good, dead letter too.")
    ] = False,
    refused: Annotated[
        bool, typer.Option("--refused", help="Rows with tries spent, not parked (yet).")
    ] = False,
    dead_letters: Annotated[
        bool,
        typer.Option(
            "--dead-letters", help="Rows rewritten as dead letters on <prefix>outbox.dlt."
        ),
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="At most this many rows.")] = 200,
    as_json: Json = False,
) -> None:
    """Outbox rows parked, refused (tries spent) or dead-lettered and still in the table, oldest
    first; without --parked, --refused or --dead-letters, all three. Values are never shown."""
    settings = get_settings()
    topics = _topics(settings, topic)
    states = [
        state
        for state, wanted in ((PARKED, parked), (REFUSED, refused), (DEAD_LETTER, dead_letters))
        if wanted
    ] or list(STATES)

    async def work(conn: Conn) -> list[Row]:
        return await stuck_rows(
            conn, settings.topic("outbox.dlt"), states=states, topics=topics, limit=limit + 1
        )

    rows = in_transaction(work)
    more, rows = len(rows) > limit, rows[:limit]
    if as_json:
        print_json_lines(_shown(row) for row in rows)
        return
    if not rows:
        out().print("no parked, refused or dead-lettered outbox rows")
        return
    grid = table(
        "id", "state", "topic", "was going to", "tries", "error", "key", "created", "parked"
    )
    for row in rows:
        shown = _shown(row)
        tries = str(row["attempts"])
        if row["dlt_attempts"] is not None:
            tries += f" (+{row['dlt_attempts']} before)"
        grid.add_row(
            str(row["id"]),
            row["state"],
            escape(row["topic"]),
            escape(row["original_topic"] or ""),
            tries,
            escape(_error_class(row)),
            escape(str(shown["key"] or "")),
            when(row["created_at"]),
            when(row["parked_at"]),
        )
    console = out()
    console.print(grid)
    if more:
        console.print(f"first {limit} shown; narrow the filters or raise --limit to see more")


@outbox_app.command("retry")
def outbox_retry(
    ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID", help="Outbox row ids, as `qm outbox ls` shows them."),
    ] = None,
    all_parked: Annotated[
        bool, typer.Option("--all-parked", help="Every parked row (of --topic, if given).")
    ] = False,
    topic: TopicOpt = None,
    as_json: Json = False,
) -> None:
    """Send parked, refused or dead-lettered outbox rows again: their tries start from 0 and the
    relay picks them up at once.

    A dead letter still in the table (on <prefix>outbox.dlt, parked or not) goes back where it
    was going before it was dead-lettered, as it was: the topic its qm.dlt.original_topic header
    names, its own headers, its value and its partition. Fix what refused it first (create the
    topic, grant the ACL): a row refused again spends its tries again. A row waiting for its
    first try is not touched. All or nothing: an id that is not such a row changes
    nothing and is named.
    """
    settings = get_settings()
    topics = _topics(settings, topic)
    chosen = _ids(ids or [])
    if chosen and (all_parked or topics):
        raise fail("give row ids, or --all-parked and/or --topic, not both")
    if not chosen and not all_parked and not topics:
        raise fail("give row ids, --all-parked or --topic (see `qm outbox ls`)")
    states = [PARKED] if all_parked else list(STATES)

    async def work(conn: Conn) -> list[Row]:
        retried = await retry_rows(
            conn,
            settings.topic("outbox.dlt"),
            ids=chosen or None,
            states=states,
            topics=topics,
        )
        missing = sorted(set(chosen) - {row["id"] for row in retried})
        if missing:  # raising rolls the whole retry back
            listed = ", ".join(str(id_) for id_ in missing)
            raise _Unmatched(f"no parked, refused or dead-lettered outbox row {listed}")
        if not retried:
            what = "parked" if all_parked else "parked, refused or dead-lettered"
            where = f" of {', '.join(topic)}" if topic else ""
            raise _Unmatched(f"nothing matches: no {what} outbox rows{where}")
        return retried

    try:
        retried = in_transaction(work)
    except _Unmatched as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json_lines({"id": row["id"], "topic": row["topic"]} for row in retried)
        return
    counts = Counter(str(row["topic"]) for row in retried)
    targets = ", ".join(f"{escape(name)} ({n})" for name, n in counts.most_common())
    out().print(f"[green]{len(retried)} sent again[/] to {targets}", highlight=False)
