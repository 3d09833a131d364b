"""`qm captures …`: what operators need to watch and mend the handoff of captures."""

from __future__ import annotations

import getpass
import json
from typing import Annotated

import typer

from app.commands.common import (
    CommandServices,
    fail,
    in_transaction,
    out,
    print_json_lines,
    table,
    when,
)
from app.core.captures import retry
from app.store import Conn, Row, captures
from app.urls import webhook_shown
from schemas.states import CaptureStatus

captures_app = typer.Typer(
    help="Captures: their handoff downstream, failures and retries.", no_args_is_help=True
)
Json = Annotated[bool, typer.Option("--json", help="JSON Lines (one object a line).")]

SHOWN = (
    "id", "job_id", "site", "status", "attempts", "url", "storage_uri", "sha256", "content_type",
    "size", "captured_at", "created_at", "next_attempt_at", "dispatched_at", "handoff_holder",
    "handoff_token", "handoff_expires_at", "handed_off_at", "failed_at", "last_error",
    "webhook_url", "dag_id",
)  # fmt: skip


def _shown(row: Row) -> dict[str, object]:
    return {name: row["webhook_shown"] if name == "webhook_url" else row[name] for name in SHOWN}


def _status(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return CaptureStatus(value.upper()).value
    except ValueError:
        raise fail(
            f"unknown status {value!r}; choose one of {', '.join(s.value for s in CaptureStatus)}"
        ) from None


@captures_app.command("list")
def captures_list(
    status: Annotated[str | None, typer.Option(help="Only captures in this status")] = None,
    site: Annotated[str | None, typer.Option(help="Only captures of this site")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first")] = 50,
    as_json: Json = False,
) -> None:
    """The newest captures, with their handoff attempts and last error."""
    chosen = _status(status)

    async def work(conn: Conn) -> list[Row]:
        return await captures.list_captures(conn, status=chosen, site=site, limit=limit)

    rows = in_transaction(work)
    if as_json:
        print_json_lines(rows)
        return
    grid = table("capture", "job", "site", "status", "attempts", "next attempt", "last error")
    for row in rows:
        grid.add_row(
            row["id"],
            row["job_id"],
            row["site"],
            str(row["status"]),
            str(row["attempts"]),
            when(row["next_attempt_at"]),
            row["last_error"] or "",
        )
    out().print(grid)


@captures_app.command("show")
def captures_show(capture_id: str, as_json: Json = False) -> None:
    """Everything about one capture, and where its site delivers it."""

    async def work(conn: Conn) -> Row | None:
        return await captures.describe_capture(conn, capture_id)

    row = in_transaction(work)
    if row is None:
        raise fail(f"no capture {capture_id!r}")
    if as_json:
        print_json_lines([{**_shown(row), "meta": row["meta"]}])
        return
    grid = table("field", "value")
    for name, value in _shown(row).items():
        grid.add_row(name, "" if value is None else str(value))
    grid.add_row("meta", json.dumps(row["meta"]))
    out().print(grid)


@captures_app.command("retry")
def captures_retry(capture_id: str) -> None:
    """Hand a FAILED capture off again from its first attempt (recorded as a capture.retried
    event naming the operator): the same as `qm dlt replay captures --key CAPTURE`."""
    command = CommandServices()
    operator = getpass.getuser()

    async def work(conn: Conn) -> Row | None:
        tx = command.tx(conn)
        row = await retry(tx, capture_id, reason=f"retried by operator {operator}")
        if row is not None:
            await tx.flush()
        return row

    row = command.in_transaction(work)
    if row is None:
        raise fail(f"no FAILED capture {capture_id!r}")
    out().print(f"[green]capture {capture_id} will be handed off again[/]")


@captures_app.command("webhook")
def captures_webhook(
    site: str,
    url: Annotated[str | None, typer.Argument(help="http(s) URL; leave out with --clear")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Deliver to no webhook")] = False,
) -> None:
    """Set the webhook a site's captures are POSTed to (Idempotency-Key: the capture id)."""
    if clear == (url is not None):
        raise fail("give a URL or --clear")
    if url is not None and not url.startswith(("http://", "https://")):
        raise fail(f"{url!r} is not an http(s) URL")

    # the URL's path or query may hold a token: the table keeps it sealed, and its scheme and
    # host for operators to see
    command = CommandServices()
    sealed = None if url is None else command.secrets.seal(url)

    async def work(conn: Conn) -> bool:
        return await captures.set_site_webhook(conn, site, webhook_shown(url), sealed)

    if not command.in_transaction(work):
        raise fail(f"no site {site!r}")
    out().print(f"[green]{site}: captures go to {webhook_shown(url) or 'no webhook'}[/]")
