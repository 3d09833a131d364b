"""What every operator command shares: its transaction, its answers, its checks of input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.settings import Settings, get_settings
from app.store import Conn, Database, sites

if TYPE_CHECKING:  # a command that reads imports neither (docs/performance.md, "The CLI")
    from app.core.transaction import Tx
    from app.crypto import SecretBox

T = TypeVar("T")

SLUG = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# a DNS name (labels of letters, digits and inner hyphens), optionally with a port
HOST = re.compile(
    r"(?=.{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:[0-9]{1,5})?"
)
DAG_ID = re.compile(r"[A-Za-z0-9_.-]{1,250}")
URL = re.compile(r"https?://[^\s]{1,4000}")


class CommandServices:
    """What a command works with, built in this one place: the settings, the secret box (built
    when first asked) and the database (opened by ``database`` and closed after)."""

    def __init__(self, settings: Settings | None = None, *, pool_size: int = 1) -> None:
        self.settings = settings or get_settings()
        self.pool_size = pool_size

    @cached_property
    def secrets(self) -> SecretBox:
        from app.crypto import SecretBox

        return SecretBox.from_settings(self.settings)

    def tx(self, conn: Conn, operator: str | None = None) -> Tx:
        """A transaction's services on ``conn`` (its outbox is flushed by the caller); an
        operator's action names them in its events (``operator``)."""
        from app.core.transaction import Tx, TxServices

        return Tx(conn, TxServices(self.settings, self.secrets), operator=operator)

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[Database]:
        """The configured database, closed when the block ends."""
        db = Database.from_settings(self.settings, pool_size=self.pool_size)
        try:
            yield db
        finally:
            await db.close()

    def in_transaction(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction against the configured database."""

        async def main() -> T:
            async with self.database() as db, db.transaction() as conn:
                return await work(conn)

        return asyncio.run(main())


def in_transaction(work: Callable[[Conn], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction against the configured database."""
    return CommandServices().in_transaction(work)


# A pipe has no width: printed to one, a table is as wide as its longest row, so that no value
# (a UUID, a URL) is cut over lines and every row stays one line for grep and cut.
PIPED_WIDTH = 100_000


def out(*, stderr: bool = False) -> Console:
    """Where a command prints: a terminal at its width, a pipe or file without a width."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPED_WIDTH)


async def known_site(conn: Conn, site: str | None) -> None:
    """Exit 2 with one line unless ``site`` (when given) exists: an empty list for a site that is
    not there would read as "nothing yet"."""
    if site is not None and not await sites.has_site(conn, site):
        raise fail(f"no site {site!r}; `qm sites list` shows them")


def fail(message: str) -> typer.Exit:
    """One red line on stderr; raise the returned exit (code 2)."""
    Console(stderr=True).print(Text(message, style="red"), soft_wrap=True)
    return typer.Exit(2)


def table(*columns: str, title: str | None = None) -> Table:
    """A table whose cells wrap (long words fold) when the terminal is narrow (never piped)."""
    grid = Table(title=title)
    for name in columns:
        grid.add_column(name, overflow="fold")
    return grid


def plain(value: Any) -> Any:
    """A value as JSON can hold it: times in ISO 8601, enums by value."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def print_json_lines(rows: Iterable[Mapping[Any, Any]]) -> None:
    """One JSON object a line (JSON Lines), for ``--json``."""
    for row in rows:
        typer.echo(json.dumps({key: plain(value) for key, value in row.items()}))


def when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def span(seconds: float) -> str:
    """A duration in its two largest units: 45s, 4m59s, 2h03m, 3d04h."""
    whole = int(abs(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def relative(value: datetime | None, now: datetime) -> str:
    """'5s ago' or 'in 4m59s', against the database's clock (``now``)."""
    if value is None:
        return ""
    seconds = (value - now).total_seconds()
    return f"in {span(seconds)}" if seconds > 0 else f"{span(seconds)} ago"


# --- checks of input: each raises a BadParameter saying what is wrong and what is right --


def check_slug(value: str) -> str:
    if not SLUG.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a site slug: use 1 to 63 lowercase letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return value


def check_host(value: str | None) -> str | None:
    if value is not None and not HOST.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a host name: give one like board.example.com (optionally :port),"
            " without scheme, path or spaces"
        )
    return value


def check_dag_id(value: str | None) -> str | None:
    if value and not DAG_ID.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not an Airflow DAG id: use letters, digits, '_', '.' or '-'"
            " ('' clears it)"
        )
    return value


def check_url(value: str | None) -> str | None:
    if value and not URL.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not an http(s) URL: give one like https://board.example.com/me"
            " ('' clears it)"
        )
    return value


def check_username(value: str) -> str:
    if not 1 <= len(value) <= 320 or not value.isprintable() or value != value.strip():
        raise typer.BadParameter(
            f"{value!r} is not a user name: give 1 to 320 printable characters, without leading"
            " or trailing spaces"
        )
    return value
