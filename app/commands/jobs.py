"""`qm jobs …`: what operators do to a job, such as ending a live lease."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from app.crypto import SecretBox
from app.leasing import Services, Tx, revoke
from app.settings import get_settings
from app.store import Database, Row, jobs

jobs_app = typer.Typer(help="Jobs: end a live lease.")
console = Console()
err = Console(stderr=True)


async def _revoke(job_id: str, reason: str) -> tuple[Row | None, Row | None]:
    """The revoked job (None when it was not running) and the job as it stands."""
    settings = get_settings()
    db = Database.from_settings(settings, pool_size=1)
    try:
        async with db.transaction() as conn:
            tx = Tx(conn, Services(settings, SecretBox.from_settings(settings)))
            revoked = await revoke(tx, job_id, reason)
            await tx.flush()
            return revoked, await jobs.describe_job(conn, job_id)
    finally:
        await db.close()


@jobs_app.command("revoke")
def jobs_revoke(
    job_id: Annotated[str, typer.Argument(help="The job whose lease ends")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the job and in its events")],
) -> None:
    """End a RUNNING job's lease now: its token stops working, its holder gets job.lease_lost,
    its account goes back (after the site's cooldown) and to the next waiting job."""
    if not reason.strip() or len(reason) > 400:
        err.print("[red]--reason must be 1 to 400 characters[/]")
        raise typer.Exit(2)
    revoked, job = asyncio.run(_revoke(job_id, reason.strip()))
    if job is None:
        err.print(f"[red]no job {job_id!r}[/]")
        raise typer.Exit(2)
    if revoked is None:
        err.print(
            f"[red]job {job_id} is not running (status {job['status']}); nothing to revoke[/]"
        )
        raise typer.Exit(2)
    console.print(
        f"[green]lease {revoked['revoked_token']} of job {job_id} revoked[/]; "
        "its holder is told job.lease_lost"
    )
