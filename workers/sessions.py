"""The session family: session.upload, and the session state a job.finish carries."""

from __future__ import annotations

from typing import Any

import structlog

from app.leasing import Tx
from app.store import sessions
from schemas.messages import JobLeaseLost, SessionMerged, SessionUpload
from schemas.sessions import merge_storage_state

log = structlog.get_logger()


async def merge_session(
    tx: Tx, job_id: str, lease_token: int, uploaded: dict[str, Any]
) -> int | None:
    """Merge ``uploaded`` into the session of the account the lease holds; the new version.

    None when the token holds no live lease on an account. The account row is locked by the
    read, and the write repeats the version it read, so no concurrent upload is lost.
    """
    held = await sessions.held_session(tx.conn, job_id, lease_token)
    if held is None:
        return None
    kept = (
        None
        if held["storage_state"] is None
        else tx.services.secrets.open_json(bytes(held["storage_state"]))
    )
    merged = merge_storage_state(kept, uploaded)
    version = await sessions.save_session(
        tx.conn, held["account_id"], tx.services.secrets.seal_json(merged), held["version"]
    )
    if version is not None:
        tx.events.emit(
            "session",
            "merged",
            id=str(held["account_id"]),
            site=held["site"],
            status=str(version),
            job_id=job_id,
        )
        log.info("session_merged", job_id=job_id, account_id=held["account_id"], version=version)
    return version


async def upload(tx: Tx, req: SessionUpload, reply_to: str, correlation_id: str) -> dict[str, Any]:
    """Merge a collector's browser state into its account's session while it holds the lease."""
    version = await merge_session(tx, req.job_id, req.lease_token, req.storage_state)
    if version is None:
        return JobLeaseLost(
            request_id=req.request_id, job_id=req.job_id, reason="no_live_lease"
        ).model_dump(mode="json")
    return SessionMerged(request_id=req.request_id, job_id=req.job_id, version=version).model_dump(
        mode="json"
    )
