"""Jobs: status, collector, place in line, why it waits, the history of its grants; revoke."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.console.web import (
    Action,
    action_form,
    confirm_then_act,
    console_state,
    render,
    text_field,
    url_id,
)
from app.core.operations import revoke_lease
from app.core.waits import job_history, wait_reasons
from app.store import budgets, views
from schemas.states import JobStatus

LIMIT = 200


async def job_list(request: Request) -> Response:
    query = request.query_params
    site = query.get("site") or None
    status = query.get("status") or None
    collector = query.get("collector") or None
    if status is not None and status not in JobStatus.__members__:
        raise HTTPException(400, f"no job status {status!r}")
    async with console_state(request).db.transaction() as conn:
        sites = [row["slug"] for row in await views.site_overview(conn)]
        rows = await views.list_jobs(
            conn, site=site, status=status, collector=collector, limit=LIMIT
        )
    return render(request, "jobs.html", jobs=rows, sites=sites, site=site, status=status,
                  collector=collector, statuses=list(JobStatus.__members__))  # fmt: skip


async def job_page(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    async with console_state(request).db.transaction() as conn:
        job = await views.job_detail(conn, job_id)
        grants = await views.job_grants(conn, job_id)
        waiting = job is not None and job["status"] == JobStatus.QUEUED
        held_by = await budgets.why_waiting(conn, job["site"]) if job and waiting else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return render(
        request,
        "job.html",
        job=job,
        grants=grants,
        position=job["ahead"] + 1 if waiting else None,
        reasons=wait_reasons(job, held_by) if waiting else [],
        history=job_history(job, list(grants)),
    )


async def revoke(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    form = await action_form(request)
    reason = text_field(form, "reason")
    back = f"/jobs/{url_id(job_id)}"
    what = ("Its lease ends now: its holder is told job.lease_lost, its account goes back (after "
            "the site's cooldown) and to the next waiting job.")  # fmt: skip
    return await confirm_then_act(
        request,
        form,
        Action(
            f"Revoke the lease of job {job_id}",
            what,
            f"{back}/revoke",
            back,
            fields={"reason": reason},
            reason_field=True,
        ),
        lambda tx: revoke_lease(tx, job_id, reason),
        succeeded=lambda row: f"the lease of job {job_id} is revoked; its holder is told",
        refused=f"job {job_id} is not running: nothing to revoke",
        ready=bool(reason),
    )


# job and capture ids may hold '/': the action's route comes first, or the page's would take it
routes = [
    Route("/jobs", job_list, methods=["GET"]),
    Route("/jobs/{job_id:path}/revoke", revoke, methods=["POST"]),
    Route("/jobs/{job_id:path}", job_page, methods=["GET"]),
]
