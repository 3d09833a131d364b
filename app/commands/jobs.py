"""`qm jobs …`: which jobs run and wait, why a waiting job waits, and ending a live lease."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape

from app.commands.common import (
    CommandServices,
    check_slug,
    fail,
    in_transaction,
    known_site,
    out,
    plain,
    print_json_lines,
    relative,
    table,
    when,
)
from app.core.leases import revoke
from app.store import Conn, Row, budgets, jobs, views
from schemas.states import JobStatus

jobs_app = typer.Typer(help="Jobs: what runs, what waits and why.", no_args_is_help=True)


@jobs_app.command("list")
def jobs_list(
    site: Annotated[
        str | None,
        typer.Option(help="Only this site's jobs", callback=lambda v: v and check_slug(v)),
    ] = None,
    status: Annotated[
        JobStatus | None, typer.Option(case_sensitive=False, help="Only jobs in this state")
    ] = None,
    collector: Annotated[str | None, typer.Option(help="Only this collector's jobs")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most jobs shown")] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON Lines (one object a line).")
    ] = False,
) -> None:
    """Jobs: running ones first, then waiting ones in the order they will be granted, then the
    latest finished."""

    async def work(conn: Conn) -> list[Row]:
        await known_site(conn, site)
        return await views.list_jobs(
            conn,
            site=site,
            status=status.value if status else None,
            collector=collector,
            limit=limit,
        )

    rows = in_transaction(work)
    if as_json:
        print_json_lines({key: row[key] for key in row if key != "now"} for row in rows)
        return
    grid = table(
        "job", "site", "collector", "status", "pos", "account", "changed", "ends", "reason"
    )
    for row in rows:
        grid.add_row(
            escape(row["id"]),
            row["site"],
            escape(row["collector"]),
            str(row["status"]),
            "" if row["position"] is None else str(row["position"]),
            escape(row["account"] or ""),
            relative(row["updated_at"], row["now"]),
            relative(_until(row), row["now"]),
            escape(row["reason"] or ""),
        )
    out().print(grid)


def _until(row: Row) -> datetime | None:
    """When a running job's lease ends, or a waiting job's wait."""
    if row["status"] == JobStatus.RUNNING:
        return row["lease_expires_at"]
    if row["status"] == JobStatus.QUEUED:
        return row["wait_deadline"]
    return None


# what holds a site's line besides capacity and accounts (docs/policy.md)
POLICY_HOLDS = {
    "budget": "the use budgets hold the line: every rested account used its budget in its window, "
    "or the site's grants a minute are used; granted within one sweep once they refill "
    "(docs/policy.md)",
    "rate_limited": "every rested account rests for the scope of the job at the head of the line "
    "(a rate limit); granted within one sweep after its reset (docs/policy.md)",
    "proxy": "no rested account has a usable proxy (each goes out through its own, which rests or "
    "is blocked, or none has room): `qm proxies list SITE` (docs/policy.md)",
}


def wait_reasons(job: Row, held_by: str | None = None) -> list[str]:
    """Why a waiting job is not granted yet, as the site stands now (``held_by``: what holds
    the site's line, ``app.store.budgets.why_waiting``)."""
    reasons = []
    if job["ahead"]:
        reasons.append(
            f"{job['ahead']} job(s) of its site wait ahead of it (first come, first served)"
        )
    if job["running"] >= job["capacity"]:
        reasons.append(
            f"the site is at capacity ({job['running']} running of {job['capacity']}); "
            f"a slot frees when a lease ends{_soonest(' (the soonest at {})', job['next_lease_end'])}"
        )
    if job["needs_account"] and not job["accounts_ready"]:
        reasons.append(_no_account(job))
    if held_by in POLICY_HOLDS:
        reasons.append(POLICY_HOLDS[held_by])
    return reasons or ["nothing: it is granted within one reaper sweep"]


def _soonest(template: str, at: datetime | None) -> str:
    return "" if at is None else template.format(when(at))


def _no_account(job: Row) -> str:
    if not job["accounts_usable"]:
        return f"the site has no account in service: add one with `qm accounts add {job['site']} …`"
    candidates = [
        (at, why)
        for at, why in (
            (job["next_rested_at"], "cooldown after use"),
            (job["next_lease_end"], "lease of another job"),
            (job["next_block_end"], "block cooldown"),
        )
        if at is not None
    ]
    if not candidates:
        return (
            f"no account free: {job['accounts_blocked_for_operator']} blocked until an operator "
            f"unblocks (`qm accounts unblock {job['site']} USER`)"
        )
    at, why = min(candidates, key=lambda pair: pair[0])
    return f"no account free until {when(at)} ({why})"


def _history(job: Row, grants: list[Row]) -> list[tuple[datetime, str]]:
    """The job's transitions: queued, each grant and its end, its final state."""
    events: list[tuple[datetime, str]] = [(job["created_at"], "QUEUED (job.start)")]
    for grant in grants:
        account = f", account {grant['account_username'] or grant['account_id'] or '-'}"
        events.append((grant["granted_at"], f"RUNNING: lease {grant['lease_token']}{account}"))
        if grant["ended_at"] is not None:
            events.append(
                (grant["ended_at"], f"lease {grant['lease_token']} ended: {grant['end_reason']}")
            )
    if job["status"] == JobStatus.QUEUED and grants:
        events.append((job["updated_at"], "QUEUED again (job.start after its lease expired)"))
    if job["finished_at"] is not None:
        reason = f" ({job['reason']})" if job["reason"] else ""
        events.append((job["finished_at"], f"{job['status']}{reason}"))
    return sorted(events, key=lambda event: event[0])


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """One job: its state, the collector that holds it, its history of grants, and while it
    waits, its place in line and why it waits."""

    async def work(conn: Conn) -> tuple[Row | None, list[Row], str | None]:
        job = await views.job_detail(conn, job_id)
        held_by = None
        if job is not None and job["status"] == JobStatus.QUEUED:
            held_by = await budgets.why_waiting(conn, job["site"])
        return job, await views.job_grants(conn, job_id), held_by

    job, grants, held_by = in_transaction(work)
    if job is None:
        raise fail(f"no job {job_id!r}; `qm jobs list` shows the latest")
    waiting = job["status"] == JobStatus.QUEUED
    facts: dict[str, Any] = {
        "id": job["id"],
        "site": job["site"],
        "collector": job["collector"],
        "status": job["status"],
        "attempts": job["attempts"],
        "account": job["account_username"],
        "lease_token": job["lease_token"],
        "lease_expires_at": job["lease_expires_at"],
        "wait_deadline": job["wait_deadline"] if waiting else None,
        "position": job["ahead"] + 1 if waiting else None,
        "waits_because": wait_reasons(job, held_by) if waiting else None,
        "reason": job["reason"],
    }
    history = _history(job, list(grants))
    if as_json:
        print_json_lines(
            [{**facts, "history": [{"at": plain(at), "what": what} for at, what in history]}]
        )
        return
    console = out()
    for name, value in facts.items():
        if value is None or name == "waits_because":
            continue
        label = "holder" if name == "collector" and job["status"] == JobStatus.RUNNING else name
        console.print(f"{label + ':':<18}{escape(str(plain(value)))}", soft_wrap=False)
    for reason in facts["waits_because"] or ():
        console.print(f"{'waits because:':<18}{escape(reason)}")
    grid = table("at", "what")
    for at, what in history:
        grid.add_row(when(at), escape(what))
    console.print(grid)


@jobs_app.command("revoke")
def jobs_revoke(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job whose lease ends")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the job and in its events")],
) -> None:
    """End a RUNNING job's lease now: its token stops working, its holder gets job.lease_lost,
    its account goes back (after the site's cooldown) and to the next waiting job."""
    if not reason.strip() or len(reason) > 400:
        raise fail("--reason must be 1 to 400 characters")
    command = CommandServices()

    async def work(conn: Conn) -> tuple[Row | None, Row | None]:
        tx = command.tx(conn)
        revoked = await revoke(tx, job_id, reason.strip())
        await tx.flush()
        return revoked, await jobs.describe_job(conn, job_id)

    revoked, job = in_transaction(work)
    if job is None:
        raise fail(f"no job {job_id!r}; `qm jobs list` shows the latest")
    if revoked is None:
        raise fail(f"job {job_id} is not running (status {job['status']}); nothing to revoke")
    out().print(
        f"[green]lease {revoked['lease_token']} of job {escape(job_id)} revoked[/]; "
        "its holder is told job.lease_lost"
    )
