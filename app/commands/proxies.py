"""`qm proxies …`: the proxies of a site, pinned to its accounts; URLs are sealed at rest and
shown as scheme://host:port only."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from app.commands.common import (
    CommandServices,
    check_slug,
    fail,
    in_transaction,
    known_site,
    out,
    print_json_lines,
    table,
    when,
)
from app.commands.sites import Json
from app.core import proxies as proxy_moves
from app.proxy_urls import proxy_label
from app.store import Conn, Row, proxies, sites

proxies_app = typer.Typer(
    help="Proxies of a site, pinned to its accounts (one each, until the proxy fails).",
    no_args_is_help=True,
)

Site = Annotated[
    str, typer.Argument(metavar="SITE", help="The site's slug, e.g. board", callback=check_slug)
]
Url = Annotated[
    str,
    typer.Argument(
        metavar="URL",
        help="scheme://[user:password@]host:port (http, https, socks5); '-' reads it from stdin, "
        "which keeps the password out of the shell's history",
    ),
]


def _label(url: str) -> str:
    """The proxy's label (what names it) of ``url``; exit 2 with why for no proxy URL."""
    try:
        return proxy_label(url)
    except ValueError as exc:
        raise fail(str(exc)) from None


def _read_url(url: str) -> str:
    return sys.stdin.readline().strip() if url == "-" else url


@proxies_app.command("add")
def proxies_add(
    site: Site,
    url: Url,
    max_accounts: Annotated[
        int, typer.Option(min=1, max=10_000, help="Most accounts pinned to it (K)")
    ] = 1,
    cooldown_seconds: Annotated[
        int, typer.Option(min=0, max=30 * 86400, help="Its rest after a reported failure")
    ] = 300,
    block_after: Annotated[
        int, typer.Option(min=1, max=1000, help="Failures in a row that block it")
    ] = 3,
) -> None:
    """Add a proxy to a site; accounts are pinned to it at their first grant, up to
    --max-accounts. Its URL is sealed at rest (QM_SECRET_KEYS)."""
    url = _read_url(url)
    label = _label(url)
    command = CommandServices()
    sealed = command.secrets.seal(url.strip())

    async def work(conn: Conn) -> object:
        if await sites.lock_site(conn, site) is None:
            return "no_site"
        return await proxies.add_proxy(
            conn,
            site=site,
            label=label,
            url_sealed=sealed,
            max_accounts=max_accounts,
            cooldown_seconds=cooldown_seconds,
            block_after=block_after,
        )

    result = command.in_transaction(work)
    if result == "no_site":
        raise fail(f"no site {site!r}; add it with `qm sites add {site} --host …`")
    if result is None:
        raise fail(f"site {site!r} already has a proxy {label}")
    out().print(f"[green]proxy {label} added to {site}[/] (up to {max_accounts} accounts)")


def _proxy_json(row: Row) -> dict[str, Any]:
    keys = (
        "id", "site", "label", "status", "accounts", "max_accounts", "resting", "available_at",
        "consecutive_failures", "failure_count", "cooldown_seconds", "block_after",
        "blocked_reason",
    )  # fmt: skip
    return {key: row[key] for key in keys}


@proxies_app.command("list")
def proxies_list(
    site: Annotated[
        str | None, typer.Argument(metavar="[SITE]", help="Only this site's proxies")
    ] = None,
    as_json: Json = False,
) -> None:
    """List proxies (scheme://host:port, never credentials): accounts pinned, rest, failures."""

    async def work(conn: Conn) -> list[Row]:
        await known_site(conn, site)
        return await proxies.list_proxies(conn, site)

    rows = in_transaction(work)
    if as_json:
        print_json_lines(_proxy_json(row) for row in rows)
        return
    grid = table("id", "site", "proxy", "status", "accounts", "rests until", "failures", "reason")
    for row in rows:
        grid.add_row(
            str(row["id"]),
            row["site"],
            row["label"],
            str(row["status"]),
            f"{row['accounts']} of {row['max_accounts']}",
            when(row["available_at"]) if row["resting"] else "",
            f"{row['consecutive_failures']} in a row ({row['failure_count']} in all; "
            f"blocks at {row['block_after']})",
            row["blocked_reason"] or "",
        )
    out().print(grid)


_DONE = {"block": "blocked", "unblock": "unblocked", "remove": "removed"}


def _operator_move(site: str, url: str, move: str, reason: str | None = None) -> Row | None:
    label = _label(_read_url(url))
    command = CommandServices()

    async def work(conn: Conn) -> Row | None:
        tx = command.tx(conn)
        if move == "block":
            row = await proxy_moves.block(tx, site, label, reason or "operator")
        elif move == "unblock":
            row = await proxy_moves.unblock(tx, site, label)
        else:
            row = await proxy_moves.remove(tx, site, label)
        await tx.flush()
        return row

    row = command.in_transaction(work)
    if row is None:
        raise fail(
            f"site {site!r} has no proxy {label} that can be {_DONE[move]} from its status; "
            f"`qm proxies list {site}` shows them"
        )
    return row


@proxies_app.command("remove")
def proxies_remove(site: Site, url: Url) -> None:
    """Remove a proxy; its accounts are pinned to another at their next grant."""
    row = _operator_move(site, url, "remove")
    assert row is not None
    out().print(f"proxy {row['label']} removed from {site}; {row['accounts']} account(s) unpinned")


@proxies_app.command("block")
def proxies_block(
    site: Site, url: Url, reason: Annotated[str, typer.Option()] = "operator"
) -> None:
    """Block a proxy (ACTIVE -> BLOCKED): its accounts move to healthy proxies with room."""
    row = _operator_move(site, url, "block", reason)
    assert row is not None
    out().print(f"proxy {row['label']} of {site} is now BLOCKED; its accounts moved")


@proxies_app.command("unblock")
def proxies_unblock(site: Site, url: Url) -> None:
    """Return a blocked proxy to service (BLOCKED -> ACTIVE), its failures in a row forgotten."""
    row = _operator_move(site, url, "unblock")
    assert row is not None
    out().print(f"proxy {row['label']} of {site} is now ACTIVE")
