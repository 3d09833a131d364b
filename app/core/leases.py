"""Leases: a job's grant, release, revoke and expiry, shared by the claim worker and the reapers.

Each function runs inside the caller's transaction, after the caller took the site's lock, and
writes its replies and events to the caller's outbox (rule 5: effects, replies and events commit
together or not at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError

from app.core import proxies
from app.core.replies import reject, tell_lease_lost
from app.core.seeds import hand_out_with_grant, settle
from app.core.transaction import Tx
from app.crypto import MissingKey, NoSecretKeys
from app.dlt import Origin, dead_letter_headers, dlt_topic
from app.errors import Disposition, classify
from app.lease_secrets import lease_secret_hash, new_lease_secret
from app.sealing import Unsealable, load_public_key, seal
from app.store import Row, accounts, job_ends, job_sweeps, jobs, sites
from schemas.messages import (
    CORRELATION_ID,
    GrantedAccount,
    GrantedProxy,
    GrantedSeed,
    GrantedSession,
    JobGranted,
    SeedResult,
    seal_context,
)
from schemas.states import AccountStatus, JobStatus

log = structlog.get_logger()


def granted_reply(
    tx: Tx, job: Row, seeds: Sequence[GrantedSeed] = (), *, lease_secret: str
) -> dict[str, Any]:
    """The ``job.granted`` message of a job just granted: its lease secret, account secret,
    session and proxy URL sealed to the requester's public key, so no other reader of the reply
    topic can open them (nor act on the lease: every follow-up presents the lease secret)."""
    account = session = proxy = None
    secrets = tx.services.secrets
    if job["public_key"] is None:  # queued before every start had to name one
        raise Unsealable("the job has no public key to seal its lease secret to")
    requester = load_public_key(job["public_key"])  # required by every job.start
    sealed_lease_secret = seal(
        requester, lease_secret.encode(), seal_context("lease.secret", job["id"])
    )
    if job["account_id"] is not None:
        secret = secrets.open(bytes(job["account_secret"])).encode()
        account = GrantedAccount(
            id=str(job["account_id"]),
            username=job["account_username"],
            secret=seal(requester, secret, seal_context("account.secret", job["id"])),
        )
        if job["session_version"] is not None:
            # the stored JSON, re-sealed as it is: never parsed here
            state = secrets.open(bytes(job["session_state"])).encode()
            session = GrantedSession(
                version=job["session_version"],
                storage_state=seal(
                    requester, state, seal_context("session.storage_state", job["id"])
                ),
            )
        if job["proxy_id"] is not None:  # its credentials travel as the secret's do
            try:
                url = secrets.open(bytes(job["proxy_url"])).encode()
            except MissingKey:  # the proxy's fault, not the account's: the account stays
                raise GrantRefused(PROXY_UNREADABLE) from None
            sealed = seal(requester, url, seal_context("proxy.url", job["id"]))
            proxy = GrantedProxy(label=job["proxy_label"], url=sealed)
    return JobGranted(
        request_id=job["request_id"],
        job_id=job["id"],
        lease_token=job["lease_token"],
        lease_secret=sealed_lease_secret,
        granted_at=job["granted_at"],
        lease_expires_at=job["lease_expires_at"],
        upload_key=secrets.upload_key,
        account=account,
        session=session,
        proxy=proxy,
        seeds=list(seeds),
        session_check_url=job["session_check_url"],
    ).model_dump(mode="json")


async def grant_waiting(tx: Tx, site: str, now: datetime | None = None) -> list[str]:
    """Grant the site's waiting jobs in FIFO order while capacity and accounts allow.

    Each granted job gets its ``job.granted`` on its own reply topic, and its start request's
    inbox row now holds that grant. Every grant makes a secret of its own; the job keeps its
    hash only. Returns the granted job ids.
    """
    granted: list[str] = []
    while True:
        lease_secret = new_lease_secret()
        job = await jobs.grant_next_waiting(tx.conn, site, lease_secret_hash(lease_secret), now)
        if job is None:
            break
        seeds = await hand_out_with_grant(tx, job, now)
        try:
            message = sealed_grant(tx, job, seeds, lease_secret=lease_secret)
        except GrantRefused as refused:  # that one job ends; the grant goes on to the next waiter
            await refuse_grant(tx, job, refused.reason, now)
            if not job["more_waiting"]:
                break
            continue
        tx.answer_start(job, message)
        tx.events.job("granted", job)
        log.info(
            "lease_granted",
            job_id=job["id"],
            site=site,
            account_id=job["account_id"],
            lease_token=job["lease_token"],
        )
        granted.append(job["id"])
        if not job["more_waiting"]:
            break
    return granted


UNUSABLE_PUBLIC_KEY = "unusable_public_key"
ACCOUNT_UNREADABLE = "account_unreadable"
PROXY_UNREADABLE = "proxy_unreadable"
UNREADABLE_NOTE = "its secret or session opens with no key of QM_SECRET_KEYS"


class GrantRefused(Exception):
    """A grant that cannot be sealed to its job or opened: ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sealed_grant(
    tx: Tx, job: Row, seeds: Sequence[GrantedSeed], *, lease_secret: str
) -> dict[str, Any]:
    """The job's ``job.granted``; ``GrantRefused`` when its account's secret or session opens
    with no configured key (``account_unreadable``) or its public key cannot be sealed to
    (``unusable_public_key``). No I/O happens here, so nothing else is to undo."""
    try:
        return granted_reply(tx, job, seeds, lease_secret=lease_secret)
    except NoSecretKeys:
        raise  # the process lacks its keys: no job or account is to blame
    except MissingKey:
        raise GrantRefused(ACCOUNT_UNREADABLE) from None
    except ValidationError:
        raise  # a reply the contract refuses is a bug, not the job's key
    except ValueError:  # Unsealable, or X25519 refusing the key in the exchange
        raise GrantRefused(UNUSABLE_PUBLIC_KEY) from None


async def refuse_grant(tx: Tx, job: Row, reason: str, now: datetime | None = None) -> None:
    """End a job just granted whose grant cannot be sealed or opened: RUNNING -> FAILED with
    ``reason``, ``job.rejected`` to its start, and what it was granted (capacity slot, account,
    seeds) released by conditional updates. An account no key opens goes USING -> INACTIVE
    with the reason in ``blocked_reason`` (``account.unreadable`` on qm.events); a proxy whose
    URL no key opens is blocked and its accounts moved, so the next waiter is not refused too."""
    if reason == ACCOUNT_UNREADABLE and job["account_id"] is not None:
        retired = await accounts.retire_unreadable(
            tx.conn,
            account_id=job["account_id"],
            job_id=job["id"],
            lease_token=job["lease_token"],
            reason=UNREADABLE_NOTE,
        )
        if retired is not None:
            tx.events.account("unreadable", retired, job_id=job["id"])
            tx.site_changed(job["site"])  # the site may have no usable account left
    failed = await job_ends.fail_granted_job(tx.conn, job["id"], job["lease_token"], reason)
    assert failed is not None  # granted in this transaction, under the site's lock
    account, holds_seeds = await jobs.release_lease(
        tx.conn,
        job=job,
        lease_token=job["lease_token"],
        outcome=reason,
        blocked=False,
        failed=False,  # the account did nothing wrong: no error counted, no rest
        rest_seconds=0,
        reason=None,
    )
    if account is not None:
        tx.events.account("released", account, job_id=job["id"])
    if reason == PROXY_UNREADABLE:
        note = "its URL opens with no key of QM_SECRET_KEYS"
        await proxies.block(tx, job["site"], job["proxy_label"], note)
    if holds_seeds:
        await settle(tx, job, release_reason=reason, now=now)
    tx.events.job("rejected", failed)
    reject(tx, failed, reason)
    log.warning(
        "grant_refused",
        job_id=job["id"],
        site=job["site"],
        account_id=job["account_id"],
        lease_token=job["lease_token"],
        reason=reason,
    )


async def hand_off(tx: Tx, site: str, now: datetime | None = None) -> list[str]:
    """``grant_waiting`` for a sweep, in a savepoint: a grant that fails on the database rolls
    back alone (with the messages it queued), so the sweep's own repair still commits and the
    waiters are left for the capacity-back sweep. A transient error is not a grant's: it raises."""
    mark = tx.box.mark()
    try:
        async with tx.conn.begin_nested():
            return await grant_waiting(tx, site, now)
    except Exception as exc:
        if classify(exc) is Disposition.TRANSIENT:
            raise
        tx.box.rewind(mark)
        log.exception("hand_off_failed", site=site, error_class=type(exc).__name__)
        return []


async def release_resources(
    tx: Tx,
    job: Row,
    site: Row,
    *,
    outcome: str,
    cooldown_seconds: int | None = None,
    reason: str | None = None,
    seed_results: Sequence[SeedResult] = (),
) -> Row | None:
    """Free what a job held: its account (resting, blocked, or retired at the site's
    ``retire_after_blocks``), its capacity slot, its grant, and its seeds (settled by
    ``seed_results``, the rest due again at once). Returns the account as released."""
    blocked = outcome == "blocked"
    account, holds_seeds = await jobs.release_lease(
        tx.conn,
        job=job,
        lease_token=job["lease_token"],
        outcome=outcome,
        blocked=blocked,
        failed=outcome in ("failed", "expired"),
        rest_seconds=rest_after(site, outcome, cooldown_seconds),
        reason=reason,
        retire_after_blocks=site["retire_after_blocks"],
    )
    await after_release(tx, job, account, holds_seeds, outcome=outcome, seed_results=seed_results)
    return account


def rest_after(site: Row, outcome: str, cooldown_seconds: int | None) -> int:
    """How long a released account rests: what the holder asked, else the site's rest (its
    block cooldown after a block)."""
    if cooldown_seconds is not None:
        return cooldown_seconds
    return site["block_cooldown_seconds" if outcome == "blocked" else "cooldown_seconds"]


async def after_release(
    tx: Tx,
    job: Row,
    account: Row | None,
    holds_seeds: bool,
    *,
    outcome: str,
    seed_results: Sequence[SeedResult] = (),
) -> None:
    """What follows a lease's release statement: the account's event (retired, blocked or
    released) and its seeds settled."""
    if account is not None and account["status"] == AccountStatus.INACTIVE:
        retire(tx, job, account)
    elif account is not None:
        what = "blocked" if outcome == "blocked" else "released"
        tx.events.account(what, account, job_id=job["id"])
    if holds_seeds:  # a lease without seeds has nothing to settle: no statement
        await settle(tx, job, results=seed_results, release_reason=outcome)


def retire(tx: Tx, job: Row, account: Row) -> None:
    """An account retired by its block (the site's ``retire_after_blocks`` in a row):
    ``account.retired`` (the alerts process posts it) and a log line."""
    tx.site_changed(job["site"])  # the site may have no usable account left
    tx.events.emit(
        "account",
        "retired",
        id=str(account["id"]),
        site=account["site"],
        status=str(account["status"]),
        job_id=job["id"],
        reason=f"{account['consecutive_blocks']} blocks in a row",
    )
    log.warning(
        "account_retired",
        account_id=account["id"],
        site=account["site"],
        job_id=job["id"],
        consecutive_blocks=account["consecutive_blocks"],
    )


async def revoke(tx: Tx, job_id: str, reason: str) -> Row | None:
    """An operator ends a live lease: RUNNING -> CANCELLED, whoever holds it.

    The job's token moves on (so the holder's next heartbeat, upload or finish gets
    ``job.lease_lost``), what it held is released and handed to the next waiter, and the holder
    is told ``job.lease_lost`` (reason ``revoked``) at once. None when the job is not RUNNING.
    """
    site = await sites.lock_site_of_job(tx.conn, job_id)
    if site is None:
        return None
    job = await job_ends.revoke_job(tx.conn, job_id, f"revoked: {reason}")
    if job is None:
        return None
    await release_resources(tx, job, site, outcome="revoked", reason=reason)
    await job_ends.retire_token(tx.conn, job_id, job["lease_token"])
    tell_lease_lost(tx, job, "revoked")
    tx.events.job("revoked", job)
    log.info("lease_revoked", job_id=job_id, lease_token=job["lease_token"])
    if site["has_waiting"]:
        await grant_waiting(tx, site["slug"])
    return job


DEAD_JOB_FIELDS = (
    "id",
    "site",
    "collector",
    "status",
    "reason",
    "attempts",
    "request_id",
    "created_at",
    "finished_at",
)


class AttemptsExhausted(Exception):
    """A job's lease lapsed as many times as its site allows; the job will never run again."""


# the qm.dlt.error_class header names the class by module; operators filter dead letters on it,
# so it keeps the name it was published under
AttemptsExhausted.__module__ = "app.leasing"


def dead_letter_exhausted(tx: Tx, job: Row, consumer: str) -> None:
    """A job that reached its attempt cap goes to the requests' dead-letter topic, keyed by its
    id, with the ``qm.dlt.*`` headers: its end, for operators (``qm dlt``), next to its terminal
    event. The value is the job as it ended (no secret: the job row holds none)."""
    requests = tx.settings.topic("requests")
    error = AttemptsExhausted(
        f"the lease of job {job['id']} lapsed {job['attempts']} times; its site allows "
        f"{job['attempts']} attempts"
    )
    created_ms = int(job["created_at"].timestamp() * 1000)
    headers = dead_letter_headers(
        [(CORRELATION_ID, str(job["correlation_id"]).encode())],
        Origin(requests, -1, -1, created_ms, consumer),
        error,
        job["attempts"],
        failed_at=job["finished_at"],
    )
    value = {key: job[key] for key in DEAD_JOB_FIELDS}  # times and ids as strings (Outbox.add)
    tx.box.add(dlt_topic(requests), job["id"], value, headers)


async def expire(tx: Tx, stale: Row, consumer: str, now: datetime | None = None) -> Row | None:
    """A lease that passed: RUNNING -> EXPIRED (FAILED at the site's attempt cap, with its dead
    letter named for ``consumer``), what it held released, its holder told ``job.lease_lost``,
    and the slot handed to the next waiter. None when another sweep or the holder got there first.

    An EXPIRED job may be started again, so ``job.expired`` goes to ``qm.events`` only; a job at
    its cap never runs again: its terminal ``job.failed`` goes to ``qm.job-events``."""
    site = await sites.lock_site(tx.conn, stale["site"])
    assert site is not None
    job = await job_sweeps.expire_job(
        tx.conn, stale["id"], stale["lease_token"], site["max_attempts"], now
    )
    if job is None:
        return None
    await release_resources(tx, job, site, outcome="expired")
    tell_lease_lost(tx, job, job["reason"])
    tx.events.job("expired", job)  # terminal (on qm.job-events) only when FAILED
    if job["status"] == JobStatus.FAILED:
        dead_letter_exhausted(tx, job, consumer)
    await hand_off(tx, job["site"], now)
    return job


async def end_block(
    tx: Tx, stale: Row, now: datetime | None = None
) -> tuple[Row, list[str]] | None:
    """A blocked account whose cooldown ended: BLOCKED -> ACTIVE, and its site's waiters granted;
    the account and the jobs granted. None when it changed since ``stale`` was read."""
    await sites.lock_site(tx.conn, stale["site"])  # lock order: site, then account
    account = await accounts.end_block(tx.conn, stale["id"], stale["lease_token"], now)
    if account is None:
        return None
    tx.events.account("unblocked", account)
    return account, await hand_off(tx, account["site"], now)


async def grant_site(tx: Tx, slug: str, now: datetime | None = None) -> list[str]:
    """``grant_waiting`` of a site whose capacity came back, under the site's lock."""
    await sites.lock_site(tx.conn, slug)
    return await grant_waiting(tx, slug, now)
