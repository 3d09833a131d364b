"""Handler of capture.submit: the capture row, its ``capture.accepted`` and its handoff record
commit together (rule 5); the handoff worker (``workers.handoff``) takes it from there."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import structlog

from app.handoff.records import dispatch
from app.lease_secrets import lease_secret_hash
from app.leasing import Tx
from app.store import Row, captures, domains, jobs
from schemas.messages import CaptureAccepted, CaptureSubmit, RequestConflict
from workers.jobs import lease_lost, why_lease_lost

log = structlog.get_logger()

# What makes two submissions the same capture (request_id, lease_token and lease_secret do not).
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
    with another body is a conflict; a stale token or a wrong secret gets ``job.lease_lost``.
    """
    fingerprint = capture_fingerprint(req)
    existing = await captures.describe_capture(tx.conn, req.capture_id)
    if existing is None:
        job = await jobs.describe_job(tx.conn, req.job_id)
        if job is not None and job["lease_token"] == req.lease_token:
            capture = await _add(tx, req, job["site"], fingerprint)
            if capture is not None:
                return _accepted(req)
            # a concurrent submission of the same capture_id committed first, or the lease
            # ended: the fence waited for that and then refused, so read again why
            existing = await captures.describe_capture(tx.conn, req.capture_id)
            job = await jobs.describe_job(tx.conn, req.job_id)
        if existing is None:
            return _lease_lost(req, why_lease_lost(job, req.lease_token, req.lease_secret))
    if existing["fingerprint"] != fingerprint:
        log.info("capture_conflict", capture_id=req.capture_id, job_id=req.job_id)
        return RequestConflict(request_id=req.request_id, job_id=req.job_id).model_dump(mode="json")
    return _accepted(req)


async def _add(tx: Tx, req: CaptureSubmit, site: str, fingerprint: str) -> Row | None:
    """The capture row (fenced by the job's live lease), its event and its handoff record; the
    rewrite rules its URL went through count a use only when the capture is added."""
    rewritten = await domains.plan_rewrites(tx.conn, site, [req.url])
    capture = await captures.add_capture(
        tx.conn,
        capture_id=req.capture_id,
        job_id=req.job_id,
        lease_token=req.lease_token,
        secret_hash=lease_secret_hash(req.lease_secret),
        url=rewritten.urls[0],
        storage_uri=req.storage_uri,
        sha256=req.sha256,
        content_type=req.content_type,
        size=req.size,
        captured_at=req.captured_at,
        meta=req.meta or {},
        fingerprint=fingerprint,
    )
    if capture is not None:
        await domains.record_uses(tx.conn, rewritten)
        dispatch(tx, capture["id"])
        tx.events.capture("received", capture)
        log.info("capture_received", capture_id=capture["id"], job_id=req.job_id)
    return capture


def _accepted(req: CaptureSubmit) -> dict[str, Any]:
    return CaptureAccepted(
        request_id=req.request_id, job_id=req.job_id, capture_id=req.capture_id
    ).model_dump(mode="json")


def _lease_lost(req: CaptureSubmit, reason: str) -> dict[str, Any]:
    log.info("capture_refused", capture_id=req.capture_id, job_id=req.job_id, reason=reason)
    return lease_lost(req, reason)
