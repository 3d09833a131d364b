"""`qm sites …`: the sites operators lease from (capacity, leases, cooldowns, handoff)."""

from __future__ import annotations

import getpass
from enum import StrEnum
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
    known_site,
    out,
    print_json_lines,
    table,
)
from app.store import Conn, Row, captures, sites, views

sites_app = typer.Typer(help="Sites: capacity, leases, cooldowns.", no_args_is_help=True)

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

# use budgets (docs/policy.md); 0 turns a budget off
AccountBudget = Annotated[
    int | None,
    typer.Option(
        min=0, max=1_000_000_000,
        help="Grants (or reported units) one account may take in --budget-seconds; 0: no budget",
    ),
]  # fmt: skip
BudgetSeconds = Annotated[
    int | None,
    typer.Option(min=1, max=7 * DAY, help="The sliding window of --account-budget, in seconds"),
]
GrantsPerMinute = Annotated[
    int | None,
    typer.Option(
        min=0, max=1_000_000,
        help="Grants of the whole site per minute (a token bucket, bursts up to a minute's worth); "
        "0: no limit",
    ),
]  # fmt: skip
OFF_AT_ZERO = ("account_budget", "grants_per_minute", "retire_after_blocks")


class ProxyRule(StrEnum):
    """Whether a site grants accounts only through a proxy."""

    required = "required"  # no account is granted without a proxy (`qm proxies add`)
    optional = "optional"  # one is pinned while a proxy has room; without, none


Proxy = Annotated[
    ProxyRule | None,
    typer.Option("--proxy", help="required: no account is granted without a proxy "
                 "(`qm proxies add`); optional: one is pinned while a proxy has room"),
]  # fmt: skip
RetireAfterBlocks = Annotated[
    int | None,
    typer.Option(min=0, max=1000, help="Deactivate an account after this many blocks in a row "
                 "(with an alert); 0: never"),
]  # fmt: skip


def _site_changes(**given: Any) -> dict[str, Any]:
    """The options an operator gave ('' clears a text setting, 0 turns a budget or rule off)."""
    changes = {k: (v if v != "" else None) for k, v in given.items() if v is not None}
    if "proxy_required" in changes:
        changes["proxy_required"] = changes["proxy_required"] == ProxyRule.required
    return {k: (None if k in OFF_AT_ZERO and v == 0 else v) for k, v in changes.items()}


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
    account_budget: AccountBudget = None,
    budget_seconds: BudgetSeconds = None,
    grants_per_minute: GrantsPerMinute = None,
    proxy: Proxy = None,
    retire_after_blocks: RetireAfterBlocks = None,
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
        account_budget=account_budget,
        account_budget_seconds=budget_seconds,
        grants_per_minute=grants_per_minute,
        proxy_required=proxy,
        retire_after_blocks=retire_after_blocks,
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
    account_budget: AccountBudget = None,
    budget_seconds: BudgetSeconds = None,
    grants_per_minute: GrantsPerMinute = None,
    proxy: Proxy = None,
    retire_after_blocks: RetireAfterBlocks = None,
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
        account_budget=account_budget,
        account_budget_seconds=budget_seconds,
        grants_per_minute=grants_per_minute,
        proxy_required=proxy,
        retire_after_blocks=retire_after_blocks,
    )
    if not changes:
        raise fail("nothing to change: give at least one option (see `qm sites set --help`)")
    row = in_transaction(lambda conn: sites.update_site(conn, slug, changes))
    if row is None:
        raise fail(f"no site {slug!r}; `qm sites list` shows them")
    shown = ", ".join(
        f"{name} {value if value is not None else '(none)'}" for name, value in changes.items()
    )
    out().print(f"site {slug}: {shown}")
    if capacity is not None and row["paused_capacity"] is not None:
        out().print(f"site {slug} is paused: capacity {capacity} when resumed (`qm sites resume`)")


@sites_app.command("remove")
def sites_remove(
    slug: Slug,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """Remove a site with its accounts, seeds and job history; refused while a job of it waits
    or runs or a capture of it is still to be handed off."""
    in_transaction(lambda conn: known_site(conn, slug))  # a mistyped slug is told before asking
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
            "account_budget", "account_budget_seconds", "grants_per_minute",
            "proxy_required", "retire_after_blocks", "paused_capacity",
        )
    }  # fmt: skip


def _budgets_cell(row: Row) -> str:
    """', budget 100 a 3600s per account, 30 grants a minute': the budgets in force, if any."""
    parts = []
    if row["account_budget"] is not None:
        parts.append(
            f"budget {row['account_budget']} a {row['account_budget_seconds']}s per account"
        )
    if row["grants_per_minute"] is not None:
        parts.append(f"{row['grants_per_minute']} grants a minute")
    return "".join(", " + part for part in parts)


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
            f"{row['running']} of {row['capacity']}"
            + (" (paused)" if row["paused_capacity"] is not None else ""),
            str(row["waiting"])
            + (f" (oldest {row['oldest_wait_seconds']:.0f}s)" if row["waiting"] else ""),
            _accounts_cell(row),
            *figures,
            f"lease {row['lease_seconds']}s, rest {row['cooldown_seconds']}s, "
            f"block rest {row['block_cooldown_seconds']}s, {row['max_attempts']} attempts"
            + (", proxy required" if row["proxy_required"] else "")
            + (f", retire after {n} blocks" if (n := row["retire_after_blocks"]) else "")
            + _budgets_cell(row),
        )
    out().print(grid)


def _pause_or_resume(slug: str, pause: bool) -> None:
    """The move the console's pause and resume make (app.core.operations), with its event."""
    from app.core.operations import pause_site, resume_site

    command = CommandServices()

    async def work(conn: Conn) -> Row | None:
        tx = command.tx(conn, operator=getpass.getuser())
        row = await (pause_site if pause else resume_site)(tx, slug)
        await tx.flush()
        return row

    row = command.in_transaction(work)
    if row is None:
        state = "paused already" if pause else "not paused"
        raise fail(f"site {slug!r} does not exist or is {state}; `qm sites list` shows them")
    if pause:
        out().print(f"site {slug} paused (capacity 0; {row['paused_capacity']} kept for resume)")
    else:
        out().print(f"site {slug} resumed with capacity {row['capacity']}")


@sites_app.command("pause")
def sites_pause(slug: Slug) -> None:
    """Capacity to 0, the capacity kept: running jobs finish, nothing is granted until resumed."""
    _pause_or_resume(slug, pause=True)


@sites_app.command("resume")
def sites_resume(slug: Slug) -> None:
    """The capacity a pause kept comes back; waiting jobs are granted within one reaper sweep."""
    _pause_or_resume(slug, pause=False)
