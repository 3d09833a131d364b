"""Captures: status, attempts, last error, where they go; retry a failed one."""

from __future__ import annotations

import json

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
    url_id,
    url_shown,
)
from app.core.operations import retry_capture
from app.store import captures, views
from schemas.states import CaptureStatus

LIMIT = 200
# what a capture's page shows: never the sealed webhook, only its scheme and host
SHOWN = (
    "id", "job_id", "site", "status", "attempts", "url", "storage_uri", "sha256", "content_type",
    "size", "captured_at", "created_at", "next_attempt_at", "dispatched_at", "handoff_holder",
    "handoff_expires_at", "handed_off_at", "failed_at", "last_error", "webhook_shown", "dag_id",
)  # fmt: skip


# where a capture came from and went: a presigned link's query or a user's password stays off
URLS = ("url", "storage_uri")


async def capture_list(request: Request) -> Response:
    query = request.query_params
    status = query.get("status") or None
    site = query.get("site") or None
    if status is not None and status not in CaptureStatus.__members__:
        raise HTTPException(400, f"no capture status {status!r}")
    async with console_state(request).db.transaction() as conn:
        sites = [row["slug"] for row in await views.site_overview(conn)]
        rows = await captures.list_captures(conn, status=status, site=site, limit=LIMIT)
    return render(request, "captures.html", captures=rows, sites=sites, site=site, status=status,
                  statuses=list(CaptureStatus.__members__))  # fmt: skip


async def capture_page(request: Request) -> Response:
    capture_id = request.path_params["capture_id"]
    async with console_state(request).db.transaction() as conn:
        row = await captures.describe_capture(conn, capture_id)
    if row is None:
        raise HTTPException(404, f"no capture {capture_id!r}")
    facts = [(name, url_shown(row[name]) if name in URLS else row[name]) for name in SHOWN]
    return render(request, "capture.html", capture=row, facts=facts,
                  meta=json.dumps(row["meta"], indent=2))  # fmt: skip


async def retry(request: Request) -> Response:
    capture_id = request.path_params["capture_id"]
    back = f"/captures/{url_id(capture_id)}"
    what = "It is handed off again from its first attempt (FAILED -> RECEIVED)."
    return await confirm_then_act(
        request,
        await action_form(request),
        Action(f"Retry capture {capture_id}", what, f"{back}/retry", back),
        lambda tx: retry_capture(tx, capture_id),
        succeeded=lambda row: f"capture {capture_id} will be handed off again",
        refused=f"capture {capture_id} is not FAILED: nothing to retry",
    )


routes = [
    Route("/captures", capture_list, methods=["GET"]),
    Route("/captures/{capture_id:path}/retry", retry, methods=["POST"]),
    Route("/captures/{capture_id:path}", capture_page, methods=["GET"]),
]
