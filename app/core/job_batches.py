"""The set path of a shared transaction: plain heartbeats, finishes and starts, one statement per
kind for all of them (``app.store.job_batches``), each request's reply its own.

A request is taken here only when it is plain: no feature the set statements do not handle
(see each function). The caller passes only fresh requests whose job appears once in the
transaction. What is not taken goes the one-request way (``app.core.jobs``), as does every
request refused here, to learn why. With fewer than two plain requests of a kind nothing is
taken: a lone request goes the one-request way, as it always did.

The order of the requests within a kind is their read order; docs/design.md ("One statement per
kind") says why applying them by kind equals applying them one after another in some order.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from app.core import proxies
from app.core.jobs import finish_reason, lease_length, not_granted, over_cap, why_not_queued
from app.core.leases import after_release, grant_waiting, rest_after
from app.core.replies import Reply, refuse_follow_up, rejected
from app.core.transaction import Route, Tx
from app.lease_secrets import lease_secret_hash
from app.store import Row, job_batches, jobs
from schemas.messages import (
    RATE_LIMITED,
    JobExtended,
    JobFinish,
    JobFinished,
    JobHeartbeat,
    JobStart,
)
from schemas.states import JobStatus

log = structlog.get_logger()

# below this many plain requests of a kind, the one-request way is as cheap
SMALLEST_BATCH = 2


def plain_heartbeat(tx: Tx, req: JobHeartbeat) -> bool:
    """A heartbeat the set path extends: no ``units``, within the cap."""
    return req.units is None and over_cap(tx, req) is None


async def heartbeats(tx: Tx, batch: Sequence[tuple[int, JobHeartbeat]]) -> dict[int, Reply]:
    """Extend the live leases of plain heartbeats (no ``units``, within the cap) in one
    statement; each heartbeat's reply by its index. A lease not extended is refused as
    ``jobs.heartbeat`` refuses it (``refuse_follow_up`` reads why)."""
    plain = [(n, req) for n, req in batch if plain_heartbeat(tx, req)]
    if len(plain) < SMALLEST_BATCH:
        return {}
    extended = await job_batches.extend_leases(
        tx.conn,
        [
            job_batches.Heartbeat(
                req.job_id,
                req.lease_token,
                lease_secret_hash(req.lease_secret),
                None if req.extend_seconds is None else lease_length(tx, req.extend_seconds, 0),
            )
            for _, req in plain
        ],
    )
    replies: dict[int, Reply] = {}
    for n, req in plain:
        job = extended.get(req.job_id)
        if job is None:
            replies[n] = await refuse_follow_up(tx, req, "lease_extend_refused")
            continue
        tx.events.job("extended", job)  # the lease's new expiry, for the audit's history
        replies[n] = JobExtended(
            request_id=req.request_id, job_id=req.job_id, lease_expires_at=job["lease_expires_at"]
        ).model_dump(mode="json")
    return replies


def plain_finish(tx: Tx, req: JobFinish) -> bool:
    """A finish the set path ends: an existing job, and nothing to upload, count, settle by
    result or rest for a rate limit; a proxy that failed is told on the one-request way."""
    return (
        req.job_id in tx.job_sites
        and req.session_state is None
        and req.units is None
        and not req.seed_results
        and req.outcome != RATE_LIMITED
        and not req.proxy_failed
    )


async def finishes(tx: Tx, batch: Sequence[tuple[int, JobFinish]]) -> dict[int, Reply]:
    """End the jobs of plain finishes in one statement and release their leases in another;
    then each site's waiting jobs are granted once. Each finish's reply by its index; one that
    matched no live lease is refused as ``jobs.finish`` refuses it."""
    plain = [(n, req) for n, req in batch if plain_finish(tx, req)]
    if len(plain) < SMALLEST_BATCH:
        return {}
    sites: dict[str, Row] = {}
    for _, req in plain:  # locked by the transaction's first statement
        site = await tx.site_of_job(req.job_id)
        assert site is not None  # the job exists: its site is locked
        sites[req.job_id] = site
    ended = await job_batches.finish_jobs(
        tx.conn,
        [
            job_batches.Finish(
                req.job_id,
                req.lease_token,
                lease_secret_hash(req.lease_secret),
                JobStatus.SUCCEEDED if req.outcome == "succeeded" else JobStatus.FAILED,
                finish_reason(req),
            )
            for _, req in plain
        ],
    )
    replies: dict[int, Reply] = {}
    for n, req in plain:
        if req.job_id not in ended:
            replies[n] = await refuse_follow_up(tx, req, "finish_refused")
    finished = [(n, req, ended[req.job_id]) for n, req in plain if req.job_id in ended]
    released = await _release(tx, [(req, job, sites[req.job_id]) for _, req, job in finished])
    waiting: dict[str, None] = {}  # the sites to grant, in read order
    for n, req, job in finished:
        account, holds_seeds = released[job["id"]]
        await after_release(tx, job, account, holds_seeds, outcome=req.outcome)
        if account is not None and account["proxy_id"] is not None:
            await proxies.report(tx, job, failed=False)
        tx.events.job("finished", job)
        log.info(
            "job_finished", job_id=job["id"], status=job["status"], lease_token=job["lease_token"]
        )
        if job["has_waiting"]:  # as it stood under the site's lock, which this transaction holds
            waiting[job["site"]] = None
        replies[n] = JobFinished(
            request_id=req.request_id, job_id=req.job_id, status=job["status"]
        ).model_dump(mode="json")
    for slug in waiting:  # once per site for all the slots given back
        await grant_waiting(tx, slug)
    return replies


async def _release(
    tx: Tx, finished: Sequence[tuple[JobFinish, Row, Row]]
) -> dict[str, tuple[Row | None, bool]]:
    """``release_resources``'s statement for each finished job (request, job, site), at once."""
    if not finished:
        return {}
    return await job_batches.release_leases(
        tx.conn,
        [
            job_batches.Release(
                job,
                outcome=req.outcome,
                blocked=req.outcome == "blocked",
                failed=req.outcome == "failed",
                rest_seconds=rest_after(site, req.outcome, req.cooldown_seconds),
                reason=req.reason,
                retire_after_blocks=site["retire_after_blocks"],
            )
            for req, job, site in finished
        ],
    )


class OneAtATime(Exception):
    """The set path cannot give these requests the answers one request at a time would: the
    shared transaction rolls back, and each of its requests goes again alone."""


async def _still_served(tx: Tx, req: JobStart) -> None:
    """A grant of this transaction retired its site's account (one no key opens): alone, a
    start read after it on a site left with no account is rejected ``no_accounts``, not queued.
    Rare: ``OneAtATime`` then."""
    site = await tx.site(req.site)
    if site is None or not site["has_accounts"]:
        raise OneAtATime(f"site {req.site} has no account left")


def plain_start(tx: Tx, req: JobStart) -> bool:
    """A start the set path queues: within the cap, on a site the transaction locked first that
    can serve it."""
    site = tx.locked_sites.get(req.site)
    return (
        over_cap(tx, req) is None
        and site is not None
        and (site["has_accounts"] or not req.needs.account)
    )


async def starts(tx: Tx, batch: Sequence[tuple[int, JobStart, Route]]) -> dict[int, Reply]:
    """Queue the jobs of plain starts in one statement, in read order, then grant each site's
    waiting jobs once (FIFO, these among them); each start's reply by its index, in read order:
    None when it was answered through the outbox (granted, refused at its grant, or timed out
    at once because it cannot wait), else ``job.queued`` with its position and what holds the
    line, or ``job.rejected`` when its job exists. A start that cannot wait leaves the line at
    its turn, and its site is granted again: the starts behind it may go now, as they would
    have one at a time."""
    plain = [(n, req, route) for n, req, route in batch if plain_start(tx, req)]
    if len(plain) < SMALLEST_BATCH:
        return {}
    queued = await job_batches.queue_jobs(
        tx.conn,
        [
            job_batches.Queued(
                job_id=req.job_id,
                site=req.site,
                collector=req.collector,
                needs_account=req.needs.account,
                needs_seeds=req.needs.seeds,
                lease_seconds=lease_length(
                    tx, req.lease_seconds, tx.locked_sites[req.site]["lease_seconds"]
                ),
                wait_seconds=req.wait_seconds,
                request_id=str(req.request_id),
                reply_to=route.reply_to,
                correlation_id=route.correlation_id,
                public_key=req.public_key,
                reply_partition=route.reply_partition,
                scope=req.scope,
            )
            for _, req, route in plain
        ],
    )
    replies: dict[int, Reply] = {}
    lines: dict[str, None] = {}  # the sites to grant, in read order
    for n, req, _ in plain:
        job = queued.get(req.job_id)
        if job is None:
            existing = await jobs.describe_job(tx.conn, req.job_id)
            replies[n] = rejected(req, why_not_queued(existing, req))
            continue
        tx.events.job("queued", job)
        lines[req.site] = None
    granted: set[str] = set()
    for slug in lines:  # once per site for all the starts queued on it
        granted.update(await grant_waiting(tx, slug))
    for n, req, _ in plain:
        if n in replies:
            continue
        if req.job_id in granted or tx.box.kept_reply(str(req.request_id)) is not None:
            replies[n] = None  # granted, or refused at its grant: answered through the outbox
            continue
        if req.needs.account and req.site not in tx.locked_sites:
            await _still_served(tx, req)
        replies[n] = await not_granted(tx, req)
        if req.wait_seconds == 0:  # it left the line: the jobs behind it may be granted now
            granted.update(await grant_waiting(tx, req.site))
    return replies
