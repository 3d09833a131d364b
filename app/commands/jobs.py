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
from app.core.waits import job_history as _history
from app.core.waits import wait_reasons
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
