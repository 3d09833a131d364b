"""Jobs: job.start (queue, then grant), job.heartbeat, job.finish and job.cancel.

Each runs inside the request's transaction and returns the reply to send (or None when it already
replied through the outbox, as a grant does). Business refusals are normal replies with a reason.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import proxies
from app.core.leases import grant_waiting, release_resources
from app.core.replies import (
    Reply,
    invalid,
    lease_lost_reply,
    refuse_follow_up,
    reject,
    rejected,
    why_lease_lost,
)
from app.core.sessions import merge_session, open_session_state
from app.core.transaction import Route, Tx
from app.lease_secrets import lease_secret_hash
from app.sealing import Unsealable
from app.store import Row, budgets, job_sweeps, jobs, sites
from schemas.messages import (
    RATE_LIMITED,
    JobCancel,
    JobCancelled,
    JobExtended,
    JobFinish,
    JobFinished,
    JobHeartbeat,
    JobQueued,
    JobStart,
)
from schemas.states import JobStatus

log = structlog.get_logger()


def over_cap(tx: Tx, req: JobStart | JobHeartbeat) -> Reply:
    """``request.invalid`` for a lease or wait above ``QM_MAX_LEASE_SECONDS``; None when within."""
    cap = tx.settings.max_lease_seconds
    asked = (
        {"lease_seconds": req.lease_seconds, "wait_seconds": req.wait_seconds}
        if isinstance(req, JobStart)
        else {"extend_seconds": req.extend_seconds}
    )
    for name, value in asked.items():
        if value is not None and value > cap:
            error = f"{name} {value} is over the cap of {cap} seconds (QM_MAX_LEASE_SECONDS)"
            return invalid(req, error)
    return None


def lease_length(tx: Tx, asked: int | None, site_default: int) -> int:
    """The lease a request gets: what it asked (or its site's default), within the bounds.

    Over the cap was refused before; the site's own default is held to the cap; anything below
    the safe minimum (docs/contract.md) is raised to it.
    """
    wanted = min(asked or site_default, tx.settings.max_lease_seconds)
    return max(wanted, tx.settings.shortest_lease())


async def start(tx: Tx, req: JobStart, route: Route) -> Reply:
    """Queue the job, then grant the site's waiting jobs in FIFO order (this one among them)."""
    if (refused := over_cap(tx, req)) is not None:
        return refused
    site = await tx.site(req.site)
    if site is None:
        return rejected(req, "unknown_site")
    if req.needs.account and not site["has_accounts"]:
        return rejected(req, "no_accounts")
    job = await _queue(tx, req, site, route)
    if job is None:
        return rejected(req, why_not_queued(await jobs.describe_job(tx.conn, req.job_id), req))
    tx.events.job("queued", job)
    if req.job_id in await grant_waiting(tx, req.site):
        return None  # grant_waiting sent job.granted to this request
    if tx.box.kept_reply(str(req.request_id)) is not None:
        return None  # its grant could not be sealed or opened: it was answered job.rejected
    return await not_granted(tx, req)


async def not_granted(tx: Tx, req: JobStart) -> Reply:
    """The answer to a start whose job was queued and not granted: ``job.queued`` with its
    position and what holds the line, or, when it cannot wait, its job timed out at once."""
    held_by = await budgets.why_waiting(tx.conn, req.site)
    if req.wait_seconds == 0:
        # a job held for a budget or a rate limit says so; capacity and accounts are no_capacity
        why = held_by if held_by in ("budget", RATE_LIMITED) else "no_capacity"
        timed_out = await jobs.reject_waiting_job(tx.conn, req.job_id, why)
        assert timed_out is not None  # we hold the site lock and just queued it
        tx.events.job("timed_out", timed_out)
        reject(tx, timed_out, why)
        return None
    position = await jobs.queue_position(tx.conn, req.job_id)
    return JobQueued(
        request_id=req.request_id, job_id=req.job_id, position=position, reason=held_by
    ).model_dump(mode="json")


def why_not_queued(existing: Row | None, req: JobStart) -> str:
    """The reason code of a start whose job exists and was not queued again."""
    if existing is None:
        return "job_exists"  # gone since (retention): as taken as it was
    if existing["reason"] == "attempts_exhausted":
        return "attempts_exhausted"
    restartable = existing["status"] == JobStatus.EXPIRED and existing["site"] == req.site
    if restartable and (
        existing["collector"] != req.collector or existing["public_key"] != req.public_key
    ):
        # job ids are public Kafka keys: another collector cannot take over an expired job
        return "not_yours"
    return "job_exists"


async def _queue(tx: Tx, req: JobStart, site: Row, route: Route) -> Row | None:
    """The job's row, WAITING; None when the job_id is taken."""
    return await jobs.queue_job(
        tx.conn,
        job_id=req.job_id,
        site=req.site,
        collector=req.collector,
        needs_account=req.needs.account,
        needs_seeds=req.needs.seeds,
        lease_seconds=lease_length(tx, req.lease_seconds, site["lease_seconds"]),
        wait_seconds=req.wait_seconds,
        request_id=str(req.request_id),
        reply_to=route.reply_to,
        correlation_id=route.correlation_id,
        public_key=req.public_key,
        reply_partition=route.reply_partition,
        scope=req.scope,
    )


async def heartbeat(tx: Tx, req: JobHeartbeat, route: Route) -> Reply:
    """Extend a live lease; a stale token or a lapsed lease gets job.lease_lost."""
    if (refused := over_cap(tx, req)) is not None:
        return refused
    extend = None if req.extend_seconds is None else lease_length(tx, req.extend_seconds, 0)
    job = await jobs.extend_lease(
        tx.conn, req.job_id, req.lease_token, lease_secret_hash(req.lease_secret), extend
    )
    if job is None:
        return await refuse_follow_up(tx, req, "lease_extend_refused")
    if req.units is not None:  # the lease is fenced by its extension above
        await budgets.record_units(
            tx.conn, job_id=req.job_id, lease_token=req.lease_token, units=req.units
        )
    tx.events.job("extended", job)  # the lease's new expiry, for the audit's history
    return JobExtended(
        request_id=req.request_id, job_id=req.job_id, lease_expires_at=job["lease_expires_at"]
    ).model_dump(mode="json")


async def finish(tx: Tx, req: JobFinish, route: Route) -> Reply:
    """End a job for the holder of its live lease; release its account and hand it on (rule 4)."""
    try:
        uploaded = open_session_state(tx, req.session_state, "job.finish", req.job_id)
    except Unsealable as exc:
        return invalid(req, f"session_state: {exc}")
    site = await tx.site_of_job(req.job_id)
    if site is None:
        return lease_lost_reply(req, "unknown_job")
    status = JobStatus.SUCCEEDED if req.outcome == "succeeded" else JobStatus.FAILED
    secret_hash = lease_secret_hash(req.lease_secret)
    job = await jobs.finish_job(
        tx.conn, req.job_id, req.lease_token, secret_hash, status, finish_reason(req)
    )
    if job is None:
        return await refuse_follow_up(tx, req, "finish_refused")
    if req.units is not None:  # before the release closes the grant
        await budgets.record_units(
            tx.conn, job_id=req.job_id, lease_token=req.lease_token, units=req.units
        )
    if uploaded is not None:  # the job is locked (lock order: job, then account and session);
        # the account is still the holder's until released below
        await merge_session(tx, req.job_id, req.lease_token, secret_hash, uploaded)
    account = await release_resources(
        tx,
        job,
        site,
        outcome=req.outcome,
        cooldown_seconds=req.cooldown_seconds,
        reason=req.reason,
        seed_results=req.seed_results or (),
    )
    if req.outcome == RATE_LIMITED:
        await rest_for_rate_limit(tx, job, req)
    if req.proxy_failed or (account is not None and account["proxy_id"] is not None):
        await proxies.report(tx, job, failed=req.proxy_failed)
    tx.events.job("finished", job)
    log.info("job_finished", job_id=job["id"], status=job["status"], lease_token=job["lease_token"])
    if job["has_waiting"]:  # as it stood under the site's lock, which this transaction holds
        await grant_waiting(tx, site["slug"])
    return JobFinished(
        request_id=req.request_id, job_id=req.job_id, status=job["status"]
    ).model_dump(mode="json")


def finish_reason(req: JobFinish) -> str | None:
    """The reason a finished job keeps: a block and a rate limit say so first."""
    if req.outcome == "blocked":
        return f"blocked: {req.reason or 'no reason given'}"
    if req.outcome == RATE_LIMITED:
        return f"{RATE_LIMITED}: {req.reason}" if req.reason else RATE_LIMITED
    return req.reason


async def rest_for_rate_limit(tx: Tx, job: Row, req: JobFinish) -> None:
    """A rate limit: the account the lease just gave back rests for the scope named (the job's
    own when none is, every scope when the job has none) until it resets (docs/policy.md)."""
    if job["account_id"] is None:
        return
    scope = req.scope or job["scope"] or budgets.ALL_SCOPES
    until = await budgets.rest_scope(
        tx.conn,
        account_id=job["account_id"],
        scope=scope,
        retry_after_seconds=req.retry_after_seconds,
        reset_at=req.reset_at,
    )
    tx.events.emit(
        "account",
        RATE_LIMITED,
        id=str(job["account_id"]),
        site=job["site"],
        status="ACTIVE",  # released, grantable for every other scope
        job_id=job["id"],
        reason=f"{scope} until {until.isoformat()}",
    )
    log.info(
        "account_rate_limited",
        job_id=job["id"],
        account_id=job["account_id"],
        scope=scope,
        rest_until=until.isoformat(),
    )


async def cancel(tx: Tx, req: JobCancel, route: Route) -> Reply:
    """Cancel a waiting job for its requester (the public key its start named), or a running
    one for the holder of its live lease (its account goes to the next waiter). Anyone else's
    cancel changes nothing: a job id read from an event is not enough to end someone's job."""
    site = await sites.lock_site_of_job(tx.conn, req.job_id)
    if site is None:
        return rejected(req, "unknown_job")
    job = await jobs.cancel_job(
        tx.conn, req.job_id, req.lease_token, lease_secret_hash(req.lease_secret), req.public_key
    )
    if job is None:
        existing = await jobs.describe_job(tx.conn, req.job_id)
        if existing is not None and existing["status"] == JobStatus.QUEUED:
            log.info("cancel_refused", job_id=req.job_id, reason="not_yours")
            return rejected(req, "not_yours")
        if existing is not None and existing["status"] == JobStatus.RUNNING:
            why = "lease_token_required" if req.lease_token is None else None
            why = why or why_lease_lost(existing, req.lease_token or 0, req.lease_secret)
            log.info("cancel_refused", job_id=req.job_id, lease_token=req.lease_token, reason=why)
            return lease_lost_reply(req, why)
        reason = f"job_{str(existing['status']).lower()}" if existing else "unknown_job"
        return rejected(req, reason)
    if job["was"] == JobStatus.RUNNING:
        await release_resources(tx, job, site, outcome="cancelled")
    else:
        reject(tx, job, "cancelled")  # the start request's final answer
    tx.events.job("cancelled", job)
    log.info("job_cancelled", job_id=job["id"], was=job["was"])
    if site["has_waiting"]:
        await grant_waiting(tx, site["slug"])
    return JobCancelled(request_id=req.request_id, job_id=req.job_id).model_dump(mode="json")


async def time_out_wait(tx: Tx, stale: Row, now: datetime | None = None) -> Row | None:
    """A start that waited its ``wait_seconds`` without a grant: WAITING -> TIMED_OUT, answered
    ``job.rejected`` (``timed_out``). None when it changed since ``stale`` was read."""
    await sites.lock_site(tx.conn, stale["site"])
    job = await job_sweeps.time_out_waiting_job(tx.conn, stale["id"], now)
    if job is not None:
        reject(tx, job, "timed_out")
        tx.events.job("timed_out", job)
    return job
