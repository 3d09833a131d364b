"""Handler of capture.submit: the capture row, its ``capture.accepted`` and its handoff record
commit together (rule 5); the handoff worker (``workers.handoff``) takes it from there."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import structlog

from app.handoff.records import dispatch
from app.leasing import Tx
from app.store import captures, jobs
from schemas.messages import CaptureAccepted, CaptureSubmit, JobLeaseLost, RequestConflict
from workers.jobs import why_lease_lost

log = structlog.get_logger()

# What makes two submissions the same capture (request_id and lease_token do not).
_BODY = {"job_id", "capture_id", "url", "storage_uri", "sha256", "content_type", "size"}


def capture_fingerprint(req: CaptureSubmit) -> str:
    """Hash of the capture's body as submitted: equal captures, equal fingerprints."""
    body = req.model_dump(mode="json", include=_BODY)
    body["captured_at"] = req.captured_at.isoformat()
    body["meta"] = req.meta or {}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


async def submit(
    tx: Tx, req: CaptureSubmit, reply_to: str, correlation_id: str
) -> dict[str, Any] | None:
    """Record a capture for the holder of the job's live lease and dispatch its handoff.

    The same capture again is accepted again (and changes nothing); the same ``capture_id``
    with another body is a conflict; a stale token gets ``job.lease_lost``.
    """
    fingerprint = capture_fingerprint(req)
    url = req.url  # the site's domain rewrites apply here once the store has them
    capture = await captures.add_capture(
        tx.conn,
        capture_id=req.capture_id,
        job_id=req.job_id,
        lease_token=req.lease_token,
        url=url,
        storage_uri=req.storage_uri,
        sha256=req.sha256,
        content_type=req.content_type,
        size=req.size,
        captured_at=req.captured_at,
        meta=req.meta or {},
        fingerprint=fingerprint,
    )
    accepted = CaptureAccepted(
        request_id=req.request_id, job_id=req.job_id, capture_id=req.capture_id
    ).model_dump(mode="json")
    if capture is not None:
        dispatch(tx, capture["id"])
        tx.events.capture("received", capture)
        log.info("capture_received", capture_id=capture["id"], job_id=req.job_id)
        return accepted
    existing = await captures.describe_capture(tx.conn, req.capture_id)
    if existing is not None:
        if existing["fingerprint"] == fingerprint:
            return accepted
        log.info("capture_conflict", capture_id=req.capture_id, job_id=req.job_id)
        return RequestConflict(request_id=req.request_id, job_id=req.job_id).model_dump(mode="json")
    reason = why_lease_lost(await jobs.describe_job(tx.conn, req.job_id), req.lease_token)
    log.info("capture_refused", capture_id=req.capture_id, job_id=req.job_id, reason=reason)
    return JobLeaseLost(request_id=req.request_id, job_id=req.job_id, reason=reason).model_dump(
        mode="json"
    )
