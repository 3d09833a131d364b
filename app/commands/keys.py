"""`qm keys`: a fresh sealing key (new); secrets at rest re-encrypted with the newest key of
``QM_SECRET_KEYS`` (rotate) and the values no configured key opens (check). docs/security.md,
"Rotating keys"."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
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

from app.commands.common import CommandServices, fail, out, print_json_lines, table
from app.commands.rotation import BATCH_SIZE, ColumnReport, check_column, rotate_column
from app.crypto import SecretBox
from app.sealing import private_key_text, public_key_text
from app.settings import get_settings
from app.store import Database
from app.store.sealed_columns import SEALED_COLUMNS, SealedColumn

keys_app = typer.Typer(
    help="Keys: make a sealing key; rotate and check the secrets sealed at rest.",
    no_args_is_help=True,
)
console = Console(stderr=True)

Json = Annotated[bool, typer.Option("--json", help="JSON Lines (one object a line).")]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, max=10_000, help="Rows read and written at a time.")
]


@keys_app.command("new")
def keys_new() -> None:
    """Print a new private sealing key on stdout (its public half on stderr).

    Put it first in QM_SEALING_KEYS to rotate; keep the old key after it until no collector
    still holds a grant that announced it.
    """
    key = X25519PrivateKey.generate()
    typer.echo(private_key_text(key))
    console.print(f"public key (announced to collectors as upload_key): {public_key_text(key)}")


class _Bar:
    """A progress bar on stderr, one line per column, shown only on a terminal."""

    def __init__(self, verb: str) -> None:
        err = Console(stderr=True)
        self._verb = verb
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def start(self, column: str, total: int) -> None:
        self._task = self._progress.add_task(f"{self._verb} {column}", total=total)

    def advance(self, rows: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, rows)


def _every_column(
    work: Callable[[Database, SecretBox, SealedColumn, _Bar], Awaitable[ColumnReport]], verb: str
) -> list[ColumnReport]:
    """``work`` on each sealed column in turn, with the configured keys and a progress bar."""
    settings = get_settings()
    if not settings.secret_keys.get_secret_value().strip():
        raise fail("QM_SECRET_KEYS is not set: give the keys the secrets at rest were sealed with")
    try:  # only the keys at rest: a sealing key has nothing to do here
        box = SecretBox(settings.secret_keys.get_secret_value())
    except ValueError:  # Fernet's own message is safe, but say which setting and what it wants
        raise fail(
            "QM_SECRET_KEYS holds a value that is not a Fernet key (32 bytes, url-safe base64)"
        ) from None

    async def main() -> list[ColumnReport]:
        async with CommandServices(settings, pool_size=2).database() as db:
            with _Bar(verb) as bar:
                return [await work(db, box, column, bar) for column in SEALED_COLUMNS]

    return asyncio.run(main())


def _unopened_lines(reports: Sequence[ColumnReport]) -> list[dict[str, object]]:
    table_of = {column.name: column for column in SEALED_COLUMNS}
    return [
        {
            "table": table_of[report.column].table,
            "column": table_of[report.column].column,
            "id": value.id,
            "site": value.site,
            "username": value.username,
        }
        for report in reports
        for value in report.unopened
    ]


@keys_app.command("rotate")
def keys_rotate(batch_size: BatchOpt = BATCH_SIZE, as_json: Json = False) -> None:
    """Re-encrypt every secret sealed at rest with the first key of QM_SECRET_KEYS.

    Covers accounts.secret, sessions.storage_state and sites.webhook_sealed, a batch at a time
    in key order. Each value is written only if it did not change meanwhile (a session merged
    is read again, never overwritten). Values already under the first key are left alone, so an
    interrupted run is finished by running it again, and a second run writes nothing. Values
    no configured key opens are skipped and counted (`qm keys check` lists them). Once
    `qm keys check` counts none under an older key, the older keys can be dropped from
    QM_SECRET_KEYS.
    """

    async def work(db: Database, box: SecretBox, column: SealedColumn, bar: _Bar) -> ColumnReport:
        return await rotate_column(db, box, column, batch_size=batch_size, progress=bar)

    reports = _every_column(work, "rotating")
    if as_json:
        print_json_lines(
            {
                "column": r.column,
                "rows": r.rows,
                "rotated": r.rotated,
                "already_newest": r.current,
                "no_key_opens": len(r.unopened),
                "changed_meanwhile": r.changed,
                "left": r.left,
            }
            for r in reports
        )
        return
    grid = table("column", "rows", "rotated", "already newest", "no key opens", "changed meanwhile")
    for r in reports:
        grid.add_row(
            r.column,
            str(r.rows),
            str(r.rotated),
            str(r.current),
            str(len(r.unopened)),
            str(r.changed) + (f" ({r.left} left: run again)" if r.left else ""),
        )
    screen = out()
    screen.print(grid)
    unopened = sum(len(r.unopened) for r in reports)
    if unopened:
        screen.print(
            f"[yellow]{unopened} values no key of QM_SECRET_KEYS opens were skipped: "
            "`qm keys check` lists them[/]"
        )


@keys_app.command("check")
def keys_check(batch_size: BatchOpt = BATCH_SIZE, as_json: Json = False) -> None:
    """List the secrets at rest that no key of QM_SECRET_KEYS opens (exit code 1 if any).

    Names each by table, column and row (for accounts and sessions, the site and username);
    never a value. Such a value was sealed with a key since dropped, or is damaged: put the old
    key back (after the first) and run `qm keys rotate`, or set the secret again.
    """

    async def work(db: Database, box: SecretBox, column: SealedColumn, bar: _Bar) -> ColumnReport:
        return await check_column(db, box, column, batch_size=batch_size, progress=bar)

    reports = _every_column(work, "checking")
    lines = _unopened_lines(reports)
    if as_json:
        print_json_lines(lines)
    else:
        screen = out()
        if lines:
            grid = table("table", "column", "id", "site", "username", title="no key opens")
            for line in lines:
                grid.add_row(*(escape(str(line[name] or "")) for name in line))
            screen.print(grid)
        rows = sum(r.rows for r in reports)
        older = sum(r.left for r in reports)
        screen.print(
            f"{rows} sealed values: {rows - older - len(lines)} under the first key, "
            f"{older} under an older key"
            + (" (`qm keys rotate`)" if older else "")
            + f", {len(lines)} no configured key opens",
            highlight=False,
        )
    if lines:
        raise typer.Exit(1)
