"""`qm accounts …`: the accounts of a site; secrets are read from a prompt or stdin, never echoed."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated, Any

import typer

from app.commands.common import (
    CommandServices,
    fail,
    in_transaction,
    known_site,
    out,
    print_json_lines,
    table,
    when,
)
from app.commands.sites import Json, Slug, Username
from app.store import Conn, Row, accounts, sites
from schemas.states import AccountStatus

accounts_app = typer.Typer(
    help="Accounts of a site; secrets are read from a prompt or stdin, never echoed.",
    no_args_is_help=True,
)


@accounts_app.command("add")
def accounts_add(
    site: Slug,
    username: Username,
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
        raise fail("the secret is empty: type it at the prompt or pipe it with --secret-stdin")
    command = CommandServices()
    sealed = command.secrets.seal(secret)

    async def work(conn: Conn) -> object:
        if await sites.lock_site(conn, site) is None:
            return "no_site"
        return await accounts.add_account(conn, site=site, username=username, sealed_secret=sealed)

    result = command.in_transaction(work)
    if result == "no_site":
        raise fail(f"no site {site!r}; add it with `qm sites add {site} --host …`")
    if result is None:
        raise fail(f"site {site!r} already has an account {username!r}")
    out().print(f"[green]account {username} added to {site}[/]")


def _account_json(row: Row) -> dict[str, Any]:
    keys = (
        "id", "site", "username", "status", "available_at", "blocked_until", "blocked_reason",
        "holder_collector", "holder_job_id", "lease_expires_at", "use_count", "error_count",
        "consecutive_blocks", "consecutive_errors", "created_at", "health", "proxy",
    )  # fmt: skip
    return {key: row[key] for key in keys}


def _until(row: Row) -> str:
    """When a resting or blocked account comes back by itself (blank: it is ready now or never)."""
    if row["status"] == AccountStatus.BLOCKED:
        return when(row["blocked_until"]) or "operator"
    if row["status"] == AccountStatus.USING:
        return when(row["lease_expires_at"])
    return when(row["available_at"]) if row["resting"] else ""


def _age(seconds: float) -> str:
    """'3d', '5h', '12m': how long ago the account was added."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@accounts_app.command("list")
def accounts_list(
    site: Annotated[str | None, typer.Argument(help="Only this site's accounts")] = None,
    as_json: Json = False,
) -> None:
    """List accounts (never their secrets): who holds each, until when it rests or is blocked,
    its health (new, healthy, at_risk, failing, blocked, retired: docs/policy.md) and its proxy."""

    async def work(conn: Conn) -> list[Row]:
        await known_site(conn, site)
        return await accounts.list_accounts(conn, site)

    rows = in_transaction(work)
    if as_json:
        print_json_lines(_account_json(row) for row in rows)
        return
    grid = table(
        "id", "site", "username", "status", "health", "holder", "until", "uses", "errors",
        "in a row", "age", "proxy", "reason",
    )  # fmt: skip
    for row in rows:
        grid.add_row(
            str(row["id"]),
            row["site"],
            row["username"],
            str(row["status"]),
            row["health"],
            row["holder_collector"] or "",
            _until(row),
            str(row["use_count"]),
            str(row["error_count"]),
            f"{row['consecutive_blocks']} blocks, {row['consecutive_errors']} errors",
            _age(row["age_seconds"]),
            row["proxy"] or "",
            row["blocked_reason"] or "",
        )
    out().print(grid)


def _move(site: str, username: str, target: AccountStatus, reason: str | None = None) -> None:
    """The operator's move the console makes too (app.core.operations), with its event."""
    from app.core.operations import move_account

    command = CommandServices()

    async def work(conn: Conn) -> Row | None:
        tx = command.tx(conn, operator=getpass.getuser())
        row = await move_account(tx, site=site, username=username, target=target, reason=reason)
        await tx.flush()
        return row

    row = command.in_transaction(work)
    if row is None:
        raise fail(
            f"account {username!r} of {site!r} does not exist or cannot become {target} from its "
            f"status; `qm accounts list {site}` shows it"
        )
    out().print(f"account {username} of {site} is now {target}")


@accounts_app.command("block")
def accounts_block(
    site: Slug, username: Username, reason: Annotated[str, typer.Option()] = "operator"
) -> None:
    """Block an idle account (ACTIVE -> BLOCKED) until an operator unblocks it."""
    _move(site, username, AccountStatus.BLOCKED, reason)


@accounts_app.command("unblock")
def accounts_unblock(site: Slug, username: Username) -> None:
    """Return a blocked or inactive account to service (-> ACTIVE); waiting jobs get it within a sweep."""
    _move(site, username, AccountStatus.ACTIVE)


@accounts_app.command("deactivate")
def accounts_deactivate(site: Slug, username: Username) -> None:
    """Take an idle or blocked account out of service (-> INACTIVE)."""
    _move(site, username, AccountStatus.INACTIVE)


@accounts_app.command("remove")
def accounts_remove(site: Slug, username: Username) -> None:
    """Delete an account that no job holds, with its stored session; job history keeps its grants."""

    async def work(conn: Conn) -> Row | None:
        await sites.lock_site(conn, site)  # lock order: site, then account
        return await accounts.remove_account(conn, site=site, username=username)

    if in_transaction(work) is None:
        raise fail(
            f"account {username!r} of {site!r} does not exist or a job holds it; "
            f"`qm accounts list {site}` shows it"
        )
    out().print(f"account {username} removed from {site}")
