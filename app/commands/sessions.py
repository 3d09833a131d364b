"""`qm sessions …`: what an operator may see of an account's browser session, and clearing it.

Cookie and storage values are never printed: names, domains, expiry and sizes only.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from app.commands.common import CommandServices, fail, in_transaction, out
from app.commands.common import table as fold_table
from app.core.events import Events
from app.core.sessions import state_bytes
from app.crypto import MissingKey
from app.outbox.writer import Outbox
from app.settings import get_settings
from app.store import Conn, sites
from app.store import sessions as store
from schemas.sessions import SESSION_COOKIE_EXPIRES

sessions_app = typer.Typer(help="Browser sessions of accounts: show (never values), clear.")


def _expiry(cookie: dict[str, Any]) -> str:
    expires = cookie.get("expires", SESSION_COOKIE_EXPIRES)
    if not isinstance(expires, int | float) or expires == SESSION_COOKIE_EXPIRES:
        return "session"
    return datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")


def _size(value: Any) -> int:
    return len(str(value or "").encode())


def describe(state: dict[str, Any]) -> dict[str, Any]:
    """What ``show`` prints of a storage state: no value of a cookie or an entry."""
    cookies = [
        {
            "name": c.get("name"),
            "domain": c.get("domain"),
            "path": c.get("path") or "/",
            "expires": _expiry(c),
            "bytes": _size(c.get("value")),
            "http_only": bool(c.get("httpOnly")),
            "secure": bool(c.get("secure")),
        }
        for c in state.get("cookies", [])
    ]
    origins = [
        {
            "origin": o.get("origin"),
            "local_storage_entries": len(o.get("localStorage", [])),
            "local_storage_bytes": sum(_size(e.get("value")) for e in o.get("localStorage", [])),
            "indexed_db_databases": len(o.get("indexedDB", [])),
        }
        for o in state.get("origins", [])
    ]
    return {"bytes": state_bytes(state), "cookies": cookies, "origins": origins}


def _print(site: str, username: str, row: Any, summary: dict[str, Any]) -> None:
    out().print(
        f"session of {username} ({site}): version {row['version']}, updated "
        f"{row['updated_at'].isoformat(timespec='seconds')}, {summary['bytes']} bytes, "
        f"{len(summary['cookies'])} cookies, {len(summary['origins'])} origins"
    )
    cookies = fold_table("name", "domain", "path", "expires", "bytes", "httpOnly", "secure")
    for c in summary["cookies"]:
        flags = ("yes" if c["http_only"] else "", "yes" if c["secure"] else "")
        cookies.add_row(c["name"], c["domain"], c["path"], c["expires"], str(c["bytes"]), *flags)
    out().print(cookies)
    if summary["origins"]:
        origins = fold_table(
            "origin", "localStorage entries", "localStorage bytes", "IndexedDB dbs"
        )
        for o in summary["origins"]:
            origins.add_row(
                o["origin"],
                str(o["local_storage_entries"]),
                str(o["local_storage_bytes"]),
                str(o["indexed_db_databases"]),
            )
        out().print(origins)


@sessions_app.command("show")
def sessions_show(
    site: str,
    username: Annotated[str, typer.Argument(metavar="ACCOUNT", help="The account's username")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
) -> None:
    """Show an account's session: cookie names, domains, expiry and sizes, origins; never values."""
    command = CommandServices()
    try:
        box = command.secrets
    except MissingKey as exc:
        raise fail(str(exc)) from None
    row = command.in_transaction(lambda conn: store.session_of_account(conn, site, username))
    if row is None:
        raise fail(f"site {site!r} has no account {username!r}")
    if row["version"] is None:
        out().print(f"account {username} of {site} has no session")
        return
    summary = describe(box.open_json(bytes(row["storage_state"])))
    if as_json:
        typer.echo(
            json.dumps(
                {"version": row["version"], "updated_at": row["updated_at"].isoformat(), **summary}
            )
        )
        return
    _print(site, username, row, summary)


@sessions_app.command("clear")
def sessions_clear(
    site: str,
    username: Annotated[str, typer.Argument(metavar="ACCOUNT", help="The account's username")],
) -> None:
    """Delete an account's session: its next job starts logged out."""
    settings = get_settings()

    async def work(conn: Conn) -> Any:
        # the site's lock first, as every request's transaction takes it: an upload or finish
        # merging into this session ends before the delete, or starts after it and sees it
        await sites.lock_site(conn, site)
        row = await store.clear_session(conn, site, username)
        if row is not None:
            box = Outbox(settings.outbox_shards)
            Events(settings, box).emit(
                "session",
                "cleared",
                id=str(row["account_id"]),
                site=site,
                status="cleared",
                reason="operator",
            )
            await box.flush(conn)
        return row

    row = in_transaction(work)
    if row is None:
        raise fail(f"account {username!r} of {site!r} does not exist or has no session")
    out().print(f"[green]session of {username} ({site}) cleared[/] (was version {row['version']})")
    if row["holder_job_id"]:
        out().print(
            f"job {row['holder_job_id']} holds the account now; what it uploads starts a new session"
        )
