"""`qm sites …` and `qm accounts …`: what operators need to run leasing."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from app.commands.common import (
    CommandServices,
    check_dag_id,
    check_host,
    check_slug,
    check_url,
    check_username,
    fail,
    in_transaction,
    out,
    print_json_lines,
    table,
    when,
)
from app.store import Conn, Row, accounts, captures, sites, views
from schemas.states import AccountStatus

sites_app = typer.Typer(help="Sites: capacity, leases, cooldowns.", no_args_is_help=True)
accounts_app = typer.Typer(
    help="Accounts of a site; secrets are read from a prompt or stdin, never echoed.",
    no_args_is_help=True,
)

DAY = 24 * 3600
Slug = Annotated[str, typer.Argument(help="The site's slug, e.g. board", callback=check_slug)]
Username = Annotated[str, typer.Argument(help="The account's user name", callback=check_username)]
Json = Annotated[bool, typer.Option("--json", help="JSON Lines (one object a line).")]
Host = Annotated[
    str | None, typer.Option(help="Canonical host, e.g. board.example.com", callback=check_host)
]
Capacity = Annotated[int | None, typer.Option(min=1, max=10_000, help="Most jobs running at once")]
LeaseSeconds = Annotated[int | None, typer.Option(min=1, max=DAY, help="Default lease")]
CooldownSeconds = Annotated[
    int | None, typer.Option(min=0, max=30 * DAY, help="Rest of an account after each use")
]
BlockCooldownSeconds = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=30 * DAY,
        help="Rest of an account after a block when the collector names none; "
        "0: a block stays until an operator unblocks",
    ),
]
MaxAttempts = Annotated[
    int | None, typer.Option(min=1, max=100, help="Grants of one job before it fails")
]
DagId = Annotated[
    str | None,
    typer.Option("--dag-id", help="Airflow DAG that gets this site's captures ('' clears it)",
                 callback=check_dag_id),
]  # fmt: skip
SessionCheckUrl = Annotated[
    str | None,
    typer.Option(help="Page that shows whether a session is logged in ('' clears it)",
                 callback=check_url),
]  # fmt: skip


def _site_changes(**given: Any) -> dict[str, Any]:
    """The options an operator gave ('' clears a text setting)."""
    return {k: (v if v != "" else None) for k, v in given.items() if v is not None}


@sites_app.command("add")
def sites_add(
    slug: Slug,
    host: Annotated[
        str, typer.Option(help="Canonical host, e.g. board.example.com", callback=check_host)
    ],
    capacity: Capacity = 1,
    lease_seconds: LeaseSeconds = 300,
    cooldown_seconds: CooldownSeconds = 0,
    block_cooldown_seconds: BlockCooldownSeconds = 3600,
    max_attempts: MaxAttempts = 3,
    dag_id: DagId = None,
    session_check_url: SessionCheckUrl = None,
) -> None:
    """Add a site."""
    settings = _site_changes(
        host=host,
        capacity=capacity,
        lease_seconds=lease_seconds,
        cooldown_seconds=cooldown_seconds,
        block_cooldown_seconds=block_cooldown_seconds,
        max_attempts=max_attempts,
        dag_id=dag_id,
        session_check_url=session_check_url,
    )
    if in_transaction(lambda conn: sites.add_site(conn, slug=slug, **settings)) is None:
        raise fail(f"site {slug!r} exists already; change it with `qm sites set {slug} …`")
    out().print(f"[green]site {slug} added[/] (capacity {capacity})")


@sites_app.command("set")
def sites_set(
    slug: Slug,
    host: Host = None,
    capacity: Capacity = None,
    lease_seconds: LeaseSeconds = None,
    cooldown_seconds: CooldownSeconds = None,
    block_cooldown_seconds: BlockCooldownSeconds = None,
    max_attempts: MaxAttempts = None,
    dag_id: DagId = None,
    session_check_url: SessionCheckUrl = None,
) -> None:
    """Change a site's settings; only the options given change. A raised capacity lets waiting
    jobs through within one reaper sweep."""
    changes = _site_changes(
        host=host,
        capacity=capacity,
        lease_seconds=lease_seconds,
        cooldown_seconds=cooldown_seconds,
        block_cooldown_seconds=block_cooldown_seconds,
        max_attempts=max_attempts,
        dag_id=dag_id,
        session_check_url=session_check_url,
    )
    if not changes:
        raise fail("nothing to change: give at least one option (see `qm sites set --help`)")
    if in_transaction(lambda conn: sites.update_site(conn, slug, changes)) is None:
        raise fail(f"no site {slug!r}; `qm sites list` shows them")
    shown = ", ".join(
        f"{name} {value if value is not None else '(none)'}" for name, value in changes.items()
    )
    out().print(f"site {slug}: {shown}")


@sites_app.command("remove")
def sites_remove(
    slug: Slug,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """Remove a site with its accounts, seeds and job history; refused while a job of it waits
    or runs or a capture of it is still to be handed off."""
    if not yes and not typer.confirm(
        f"remove site {slug} with its accounts, seeds and job history?"
    ):
        raise fail("nothing removed")

    async def work(conn: Conn) -> str | None:
        if await sites.lock_site(conn, slug) is None:
            return f"no site {slug!r}; `qm sites list` shows them"
        if await sites.remove_site(conn, slug) is not None:
            return None
        live = await sites.live_work(conn, slug)
        return (
            f"site {slug!r} has {live['live_jobs']} jobs waiting or running and "
            f"{live['pending_captures']} captures to hand off; let them end "
            f"(`qm jobs list --site {slug}`) and try again"
        )

    problem = in_transaction(work)
    if problem is not None:
        raise fail(problem)
    out().print(f"site {slug} removed")


def _site_json(row: Row) -> dict[str, Any]:
    return {
        key: row[key]
        for key in (
            "slug", "host", "capacity", "running", "waiting", "oldest_wait_seconds",
            "accounts_ready", "accounts_resting", "accounts_using", "accounts_blocked",
            "accounts_inactive", "grants_last_minute", "lease_seconds", "cooldown_seconds",
            "block_cooldown_seconds", "max_attempts", "dag_id", "session_check_url",
        )
    }  # fmt: skip


def _accounts_cell(row: Row) -> str:
    """'2 ready, 1 resting, 1 using': resting ones are ACTIVE but in their cooldown after use."""
    states = ("ready", "resting", "using", "blocked", "inactive")
    parts = [f"{row['accounts_' + state]} {state}" for state in states if row["accounts_" + state]]
    return ", ".join(parts) or "none"


def _captures_cell(counts: dict[str, int]) -> str:
    """'3 pending, 10 handed off, 1 failed': pending ones wait for (or are in) their handoff."""
    pending = counts.get("RECEIVED", 0) + counts.get("HANDING_OFF", 0)
    figures = [(pending, "pending"), (counts.get("HANDED_OFF", 0), "handed off")]
    figures.append((counts.get("FAILED", 0), "failed"))
    return ", ".join(f"{n} {what}" for n, what in figures if n) or "none"


@sites_app.command("list")
def sites_list(as_json: Json = False) -> None:
    """Sites with running and waiting jobs and their accounts: ready, resting after use (cooldown),
    in use, blocked, inactive."""

    async def work(conn: Conn) -> tuple[list[Row], dict[str, dict[str, int]]]:
        return await views.site_overview(conn), await captures.counts_by_site(conn)

    rows, capture_counts = in_transaction(work)
    if as_json:
        print_json_lines(
            {**_site_json(row), "captures": capture_counts.get(row["slug"], {})} for row in rows
        )
        return
    # the captures column only once there are captures: sites without a handoff stay narrow
    shown = ("captures",) if capture_counts else ()
    grid = table("site", "host", "running", "waiting", "accounts", *shown, "settings")
    for row in rows:
        figures = (_captures_cell(capture_counts.get(row["slug"], {})),) if shown else ()
        grid.add_row(
            row["slug"],
            row["host"],
            f"{row['running']} of {row['capacity']}",
            str(row["waiting"])
            + (f" (oldest {row['oldest_wait_seconds']:.0f}s)" if row["waiting"] else ""),
            _accounts_cell(row),
            *figures,
            f"lease {row['lease_seconds']}s, rest {row['cooldown_seconds']}s, "
            f"block rest {row['block_cooldown_seconds']}s, {row['max_attempts']} attempts",
        )
    out().print(grid)


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
    )  # fmt: skip
    return {key: row[key] for key in keys}


def _until(row: Row) -> str:
    """When a resting or blocked account comes back by itself (blank: it is ready now or never)."""
    if row["status"] == AccountStatus.BLOCKED:
        return when(row["blocked_until"]) or "operator"
    if row["status"] == AccountStatus.USING:
        return when(row["lease_expires_at"])
    return when(row["available_at"]) if row["resting"] else ""


@accounts_app.command("list")
def accounts_list(
    site: Annotated[str | None, typer.Argument(help="Only this site's accounts")] = None,
    as_json: Json = False,
) -> None:
    """List accounts (never their secrets): who holds each, and until when it rests or is blocked."""

    async def work(conn: Conn) -> list[Row]:
        return await accounts.list_accounts(conn, site)

    rows = in_transaction(work)
    if as_json:
        print_json_lines(_account_json(row) for row in rows)
        return
    grid = table("id", "site", "username", "status", "holder", "until", "uses", "errors", "reason")
    for row in rows:
        grid.add_row(
            str(row["id"]),
            row["site"],
            row["username"],
            str(row["status"]),
            row["holder_collector"] or "",
            _until(row),
            str(row["use_count"]),
            str(row["error_count"]),
            row["blocked_reason"] or "",
        )
    out().print(grid)


def _move(site: str, username: str, target: AccountStatus, reason: str | None = None) -> None:
    row = in_transaction(
        lambda conn: accounts.set_account_status(
            conn, site=site, username=username, target=target, reason=reason
        )
    )
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
