"""Replies a transition answers with: refusals, and the answers a job's start request gets later.

Each builds the message (a dict as the outbox takes it); those given a ``Tx`` send it there.
"""

from __future__ import annotations

from typing import Any

import structlog

from app.core.transaction import Tx
from app.lease_secrets import matches
from app.store import Row, jobs
from schemas.messages import (
    CaptureSubmit,
    JobCancel,
    JobFinish,
    JobHeartbeat,
    JobLeaseLost,
    JobRejected,
    JobStart,
    RequestInvalid,
    SeedsClaim,
    SessionUpload,
)
from schemas.states import JobStatus

log = structlog.get_logger()

Reply = dict[str, Any] | None
# requests that present a live lease's token and secret
FollowUp = JobHeartbeat | JobFinish | SeedsClaim | SessionUpload | CaptureSubmit


def why_lease_lost(job: Row | None, lease_token: int, lease_secret: str | None) -> str:
    """The reason code of a follow-up that did not match a live lease."""
    if job is None:
        return "unknown_job"
    if job["status"] != JobStatus.RUNNING:
        return f"job_{str(job['status']).lower()}"
    if job["lease_token"] != lease_token:
        return "stale_token"
    if not matches(job["lease_secret_hash"], lease_secret):
        return "wrong_secret"  # the token is public: the secret is what only the holder has
    return "lease_expired"


def lease_lost_reply(req: FollowUp | JobCancel, reason: str) -> dict[str, Any]:
    """The ``job.lease_lost`` reply to a request whose lease is not live."""
    return JobLeaseLost(request_id=req.request_id, job_id=req.job_id, reason=reason).model_dump(
        mode="json"
    )


async def refuse_follow_up(tx: Tx, req: FollowUp, event: str) -> dict[str, Any]:
    """``job.lease_lost`` for a follow-up that matched no live lease, saying why (logged as
    ``event``)."""
    job = await jobs.describe_job(tx.conn, req.job_id)
    reason = why_lease_lost(job, req.lease_token, req.lease_secret)
    log.info(event, job_id=req.job_id, lease_token=req.lease_token, reason=reason)
    return lease_lost_reply(req, reason)


def rejected(req: JobStart | JobCancel, reason: str) -> dict[str, Any]:
    """The ``job.rejected`` reply with ``reason``."""
    return JobRejected(request_id=req.request_id, job_id=req.job_id, reason=reason).model_dump(
        mode="json"
    )


def invalid(req: JobStart | JobHeartbeat | JobFinish, error: str) -> dict[str, Any]:
    return RequestInvalid(
        request_id=str(req.request_id), job_id=req.job_id, error=error
    ).model_dump(mode="json")


def reject(tx: Tx, job: Row, reason: str) -> None:
    """Answer a job's start request with ``job.rejected`` and record it in its inbox row."""
    message = JobRejected(request_id=job["request_id"], job_id=job["id"], reason=reason).model_dump(
        mode="json"
    )
    tx.answer_start(job, message)


def tell_lease_lost(tx: Tx, job: Row, reason: str) -> None:
    """Tell a job's holder its lease is gone (the reaper or an operator took it).

    It goes to the start request's reply topic with its correlation id: after the grant, the
    last reply that request can get (docs/contract.md).
    """
    tx.reply(
        job,
        JobLeaseLost(request_id=job["request_id"], job_id=job["id"], reason=reason).model_dump(
            mode="json"
        ),
    )
