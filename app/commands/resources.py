"""`qm sites …` and `qm accounts …`: what operators need to run leasing."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from app.crypto import MissingKey, SecretBox
from app.settings import get_settings
from app.store import Conn, Database, Row, accounts, captures, sites
from schemas.states import AccountStatus

T = TypeVar("T")
sites_app = typer.Typer(help="Sites: capacity, leases, cooldowns.")
accounts_app = typer.Typer(
    help="Accounts of a site; secrets are read from a prompt or stdin, never echoed."
)
console = Console()
err = Console(stderr=True)


def in_transaction(work: Callable[[Conn], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction against the configured database."""

    async def main() -> T:
        db = Database.from_settings(get_settings(), pool_size=1)
        try:
            async with db.transaction() as conn:
                return await work(conn)
        finally:
            await db.close()

    return asyncio.run(main())


def fail(message: str) -> typer.Exit:
    err.print(f"[red]{message}[/]")
    return typer.Exit(2)


@sites_app.command("add")
def sites_add(
    slug: str,
    host: Annotated[str, typer.Option(help="Canonical host, e.g. board.example.com")],
    capacity: Annotated[int, typer.Option(help="Most jobs running at once")] = 1,
    lease_seconds: Annotated[int, typer.Option(help="Default lease")] = 300,
    cooldown_seconds: Annotated[int, typer.Option(help="Rest of an account after use")] = 0,
    block_cooldown_seconds: Annotated[int, typer.Option(help="Rest after a block")] = 3600,
    max_attempts: Annotated[int, typer.Option(help="Grants of one job before it fails")] = 3,
) -> None:
    """Add a site."""

    async def work(conn: Conn) -> object:
        return await sites.add_site(
            conn,
            slug=slug,
            host=host,
            capacity=capacity,
            lease_seconds=lease_seconds,
            cooldown_seconds=cooldown_seconds,
            block_cooldown_seconds=block_cooldown_seconds,
            max_attempts=max_attempts,
        )

    if in_transaction(work) is None:
        raise fail(f"site {slug!r} exists already")
    console.print(f"[green]site {slug} added[/] (capacity {capacity})")


@sites_app.command("list")
def sites_list() -> None:
    """List sites with their running and waiting jobs and account counts."""

    async def work(conn: Conn) -> tuple[list[Row], dict[str, dict[str, int]]]:
        return await sites.list_sites(conn), await captures.counts_by_site(conn)

    rows, capture_counts = in_transaction(work)
    table = Table(
        "site", "host", "running", "capacity", "waiting", "active", "using", "blocked", "lease s",
        "captures pending", "handed off", "failed",
    )  # fmt: skip
    for row in rows:
        counts = capture_counts.get(row["slug"], {})
        table.add_row(
            row["slug"],
            row["host"],
            str(row["running"]),
            str(row["capacity"]),
            str(row["waiting"]),
            str(row["accounts_active"]),
            str(row["accounts_using"]),
            str(row["accounts_blocked"]),
            str(row["lease_seconds"]),
            str(counts.get("RECEIVED", 0) + counts.get("HANDING_OFF", 0)),
            str(counts.get("HANDED_OFF", 0)),
            str(counts.get("FAILED", 0)),
        )
    console.print(table)


@accounts_app.command("add")
def accounts_add(
    site: str,
    username: str,
    secret_stdin: Annotated[
        bool, typer.Option("--secret-stdin", help="Read the secret from stdin")
    ] = False,
) -> None:
    """Add an account; the secret is prompted for (hidden) or read from stdin."""
    secret = (
        sys.stdin.readline().rstrip("\n")
        if secret_stdin
        else typer.prompt("secret", hide_input=True)
    )
    if not secret:
        raise fail("the secret is empty")
    try:
        sealed = SecretBox.from_settings(get_settings()).seal(secret)
    except MissingKey as exc:
        raise fail(str(exc)) from None

    async def work(conn: Conn) -> object:
        if await sites.lock_site(conn, site) is None:
            return "no_site"
        return await accounts.add_account(conn, site=site, username=username, sealed_secret=sealed)

    result = in_transaction(work)
    if result == "no_site":
        raise fail(f"no site {site!r}; add it with `qm sites add`")
    if result is None:
        raise fail(f"site {site!r} already has an account {username!r}")
    console.print(f"[green]account {username} added to {site}[/]")


@accounts_app.command("list")
def accounts_list(site: Annotated[str | None, typer.Argument()] = None) -> None:
    """List accounts (never their secrets)."""
    rows = in_transaction(lambda conn: accounts.list_accounts(conn, site))
    table = Table(
        "id", "site", "username", "status", "holder", "available at", "uses", "errors", "reason"
    )
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["site"],
            row["username"],
            str(row["status"]),
            row["holder_job_id"] or "",
            row["available_at"].isoformat(timespec="seconds"),
            str(row["use_count"]),
            str(row["error_count"]),
            row["blocked_reason"] or "",
        )
    console.print(table)


def _move(site: str, username: str, target: AccountStatus, reason: str | None = None) -> None:
    row = in_transaction(
        lambda conn: accounts.set_account_status(
            conn, site=site, username=username, target=target, reason=reason
        )
    )
    if row is None:
        raise fail(
            f"account {username!r} of {site!r} does not exist or cannot become {target} from its status"
        )
    console.print(f"account {username} of {site} is now {target}")


@accounts_app.command("block")
def accounts_block(
    site: str, username: str, reason: Annotated[str, typer.Option()] = "operator"
) -> None:
    """Block an idle account (ACTIVE -> BLOCKED)."""
    _move(site, username, AccountStatus.BLOCKED, reason)


@accounts_app.command("unblock")
def accounts_unblock(site: str, username: str) -> None:
    """Return a blocked or inactive account to service (-> ACTIVE); waiting jobs get it within a sweep."""
    _move(site, username, AccountStatus.ACTIVE)


@accounts_app.command("deactivate")
def accounts_deactivate(site: str, username: str) -> None:
    """Take an idle or blocked account out of service (-> INACTIVE)."""
    _move(site, username, AccountStatus.INACTIVE)
