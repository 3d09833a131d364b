"""Set-based job transitions: many requests of one kind in one statement (arrays and ``unnest``).

Each statement here is the many-rows form of one in ``app.store.jobs`` (``_EXTEND``, ``_FINISH``,
``_RELEASE``, ``_QUEUE``), with the same conditional predicates per row: a row of the arrays that
does not match is simply not returned, and its request goes the one-request way to learn why.
The caller holds the locks of every site the rows belong to (the transaction's first statement);
rows are locked in id order (a locking CTE, ``ORDER BY id``), so two such statements in two
transactions cannot deadlock on each other. The queueing insert is the exception: ``ON CONFLICT``
locks the existing rows it meets in the arrays' order, but those are jobs of the sites the caller
locked, so no other transaction holds or waits for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection as Conn

from app.store.prepared import Prepared, Row

_EXTEND_MANY = Prepared(
    text(
        """
        WITH heartbeats AS (
            SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS bigint[]),
                                 CAST(:secret_hashes AS bytea[]), CAST(:extends AS integer[]))
                AS h (id, token, secret_hash, extend)
        ),
        locked AS MATERIALIZED (
            SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM heartbeats)
            ORDER BY j.id FOR UPDATE OF j
        ),
        job AS (
            UPDATE jobs j
            SET lease_expires_at = greatest(
                    j.lease_expires_at,
                    clock_timestamp() + make_interval(secs => coalesce(h.extend, j.lease_seconds))),
                updated_at = now()
            FROM heartbeats h
            WHERE j.id = h.id AND j.id IN (SELECT id FROM locked)
              AND j.status = 'RUNNING' AND j.lease_token = h.token
              AND j.lease_secret_hash = h.secret_hash AND j.lease_expires_at > clock_timestamp()
            RETURNING j.id, j.site, j.status, j.account_id, j.lease_token, j.lease_expires_at,
                      clock_timestamp() AS db_at
        ),
        held AS MATERIALIZED (
            SELECT a.id FROM accounts a JOIN job ON a.holder_job_id = job.id
                                                 AND a.lease_token = job.lease_token
            ORDER BY a.id FOR UPDATE OF a
        ),
        account AS (
            -- each account's lease follows its job's
            UPDATE accounts a SET lease_expires_at = job.lease_expires_at
            FROM job WHERE a.id IN (SELECT id FROM held)
              AND a.holder_job_id = job.id AND a.lease_token = job.lease_token
            RETURNING a.id
        )
        SELECT job.* FROM job
        """
    )
)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A holder's heartbeat: its job, lease token, secret's hash and the extension asked."""

    job_id: str
    lease_token: int
    secret_hash: bytes | None
    extend_seconds: int | None


async def extend_leases(conn: Conn, heartbeats: Sequence[Heartbeat]) -> dict[str, Row]:
    """``extend_lease`` of many jobs in one statement: RUNNING -> RUNNING with a later expiry for
    each live lease whose token and secret's hash match; the extended jobs by id."""
    rows = await _EXTEND_MANY.rows(
        conn,
        {
            "ids": [h.job_id for h in heartbeats],
            "tokens": [h.lease_token for h in heartbeats],
            "secret_hashes": [h.secret_hash for h in heartbeats],
            "extends": [h.extend_seconds for h in heartbeats],
        },
    )
    return {row["id"]: row for row in rows}


_FINISH_MANY = Prepared(
    text(
        """
        WITH finishes AS (
            SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS bigint[]),
                                 CAST(:secret_hashes AS bytea[]), CAST(:statuses AS text[]),
                                 CAST(:reasons AS text[]))
                AS f (id, token, secret_hash, status, reason)
        ),
        locked AS MATERIALIZED (
            SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM finishes)
            ORDER BY j.id FOR UPDATE OF j
        )
        UPDATE jobs j
        SET status = CAST(f.status AS job_status), reason = f.reason,
            finished_at = now(), updated_at = now()
        FROM finishes f
        WHERE j.id = f.id AND j.id IN (SELECT id FROM locked)
          AND j.status = 'RUNNING' AND j.lease_token = f.token
          AND j.lease_secret_hash = f.secret_hash AND j.lease_expires_at > clock_timestamp()
        RETURNING j.*, clock_timestamp() AS db_at,
                  EXISTS (SELECT 1 FROM jobs w WHERE w.site = j.site AND w.status = 'QUEUED')
                      AS has_waiting
        """
    )
)


@dataclass(frozen=True, slots=True)
class Finish:
    """A holder's finish: its job, lease, secret's hash, the status it ends in and why."""

    job_id: str
    lease_token: int
    secret_hash: bytes | None
    status: str
    reason: str | None


async def finish_jobs(conn: Conn, finishes: Sequence[Finish]) -> dict[str, Row]:
    """``finish_job`` of many jobs in one statement: RUNNING -> SUCCEEDED | FAILED for each
    live lease whose token and secret's hash match; the finished jobs by id, each with
    ``has_waiting`` (jobs wait on its site, under the site's lock the caller holds)."""
    rows = await _FINISH_MANY.rows(
        conn,
        {
            "ids": [f.job_id for f in finishes],
            "tokens": [f.lease_token for f in finishes],
            "secret_hashes": [f.secret_hash for f in finishes],
            "statuses": [f.status for f in finishes],
            "reasons": [f.reason for f in finishes],
        },
    )
    return {row["id"]: row for row in rows}


_RELEASE_MANY = Prepared(
    text(
        """
        WITH releases AS (
            SELECT * FROM unnest(CAST(:account_ids AS bigint[]), CAST(:job_ids AS text[]),
                                 CAST(:tokens AS bigint[]), CAST(:sites AS text[]),
                                 CAST(:outcomes AS text[]), CAST(:blocked AS boolean[]),
                                 CAST(:failed AS boolean[]), CAST(:rests AS integer[]),
                                 CAST(:reasons AS text[]), CAST(:retire_after AS integer[]))
                AS r (account_id, job_id, lease_token, site, outcome, blocked, failed, rest,
                      reason, retire_after)
        ),
        held AS MATERIALIZED (
            SELECT a.id FROM accounts a JOIN releases r ON a.id = r.account_id
            WHERE a.status = 'USING' AND a.holder_job_id = r.job_id
              AND a.lease_token = r.lease_token
            ORDER BY a.id FOR UPDATE OF a
        ),
        account AS (
            UPDATE accounts a
            -- health: the site's retire_after_blocks-th block in a row retires the account
            SET status = CAST(CASE WHEN NOT r.blocked THEN 'ACTIVE'
                                   WHEN a.consecutive_blocks + 1 >= r.retire_after THEN 'INACTIVE'
                                   ELSE 'BLOCKED' END AS account_status),
                -- health: blocks and errors in a row, forgotten by a success
                consecutive_blocks = CASE WHEN r.blocked THEN a.consecutive_blocks + 1
                                          WHEN r.outcome = 'succeeded' THEN 0
                                          ELSE a.consecutive_blocks END,
                consecutive_errors = CASE WHEN r.failed THEN a.consecutive_errors + 1
                                          WHEN r.outcome = 'succeeded' THEN 0
                                          ELSE a.consecutive_errors END,
                holder_job_id = NULL,
                lease_expires_at = NULL,
                available_at = now() + make_interval(secs => r.rest),
                error_count = a.error_count + CASE WHEN r.failed OR r.blocked THEN 1 ELSE 0 END,
                blocked_reason = CASE
                    WHEN r.blocked AND a.consecutive_blocks + 1 >= r.retire_after
                    THEN format('retired after %s blocks in a row: %s', a.consecutive_blocks + 1,
                                coalesce(r.reason, 'no reason given'))
                    WHEN r.blocked THEN r.reason ELSE a.blocked_reason END,
                -- a block with a rest ends by itself (the block-cooldowns sweep); without
                -- one it stays until an operator acts
                blocked_until = CASE WHEN r.blocked AND r.rest > 0
                                      AND a.consecutive_blocks + 1 < r.retire_after
                                     THEN now() + make_interval(secs => r.rest) END,
                updated_at = now()
            FROM releases r
            WHERE a.id = r.account_id AND a.id IN (SELECT id FROM held) AND a.status = 'USING'
              AND a.holder_job_id = r.job_id AND a.lease_token = r.lease_token
            RETURNING r.job_id, a.id, a.site, a.status, a.available_at, a.proxy_id,
                      a.consecutive_blocks
        ),
        slot AS (
            -- one slot back per lease, never below zero (as one release at a time would)
            UPDATE sites s SET running = s.running - least(n.leases, s.running)
            FROM (SELECT site, count(*) AS leases FROM releases GROUP BY site) n
            WHERE s.slug = n.site AND s.running > 0
        ),
        grant_ended AS (
            UPDATE job_grants g SET ended_at = now(), end_reason = r.outcome
            FROM releases r WHERE g.lease_token = r.lease_token AND g.ended_at IS NULL
        )
        -- these run after the jobs' rows were locked by their transition, so they see every
        -- seed a claim of these leases took before (the claim fences the job with FOR SHARE)
        SELECT r.job_id AS released_job_id, account.id, account.site, account.status,
               account.available_at, account.proxy_id, account.consecutive_blocks,
               EXISTS (SELECT 1 FROM seeds s WHERE s.holder_job_id = r.job_id
                       AND s.lease_token = r.lease_token AND s.status = 'ASSIGNED') AS holds_seeds
        FROM releases r LEFT JOIN account ON account.job_id = r.job_id
        """
    )
)


@dataclass(frozen=True, slots=True)
class Release:
    """A lease to end (``jobs.release_lease``'s arguments): the job's row as its transition
    returned it, the outcome, whether it counts as a block or a failure, the account's rest, the
    block's reason and the site's ``retire_after_blocks``."""

    job: Row
    outcome: str
    blocked: bool
    failed: bool
    rest_seconds: int
    reason: str | None
    retire_after_blocks: int | None


async def release_leases(
    conn: Conn, releases: Sequence[Release]
) -> dict[str, tuple[Row | None, bool]]:
    """``release_lease`` of many leases in one statement; by job id, the account as released
    (None when the job held none) and whether the lease still holds seeds."""
    rows = await _RELEASE_MANY.rows(
        conn,
        {
            "account_ids": [r.job["account_id"] for r in releases],
            "job_ids": [r.job["id"] for r in releases],
            "tokens": [r.job["lease_token"] for r in releases],
            "sites": [r.job["site"] for r in releases],
            "outcomes": [r.outcome for r in releases],
            "blocked": [r.blocked for r in releases],
            "failed": [r.failed for r in releases],
            "rests": [r.rest_seconds for r in releases],
            "reasons": [r.reason for r in releases],
            # no rule: no count of blocks reaches it
            "retire_after": [r.retire_after_blocks or 2**31 - 1 for r in releases],
        },
    )
    released: dict[str, tuple[Row | None, bool]] = {}
    for row in rows:
        account = {k: v for k, v in row.items() if k not in ("released_job_id", "holds_seeds")}
        released[row["released_job_id"]] = (
            account if account["id"] is not None else None,
            bool(row["holds_seeds"]),
        )
    return released


_QUEUE_MANY = Prepared(
    text(
        """
        INSERT INTO jobs AS j (id, site, collector, status, needs_account, needs_seeds,
                               lease_seconds, wait_deadline, request_id, reply_to,
                               correlation_id, public_key, reply_partition, scope)
        SELECT q.id, q.site, q.collector, 'QUEUED', q.needs_account, q.needs_seeds,
               q.lease_seconds, now() + make_interval(secs => q.wait_seconds),
               CAST(q.request_id AS uuid), q.reply_to, q.correlation_id, q.public_key,
               q.reply_partition, q.scope
        FROM unnest(CAST(:ids AS text[]), CAST(:sites AS text[]), CAST(:collectors AS text[]),
                    CAST(:needs_account AS boolean[]), CAST(:needs_seeds AS integer[]),
                    CAST(:lease_seconds AS integer[]), CAST(:wait_seconds AS integer[]),
                    CAST(:request_ids AS text[]), CAST(:reply_tos AS text[]),
                    CAST(:correlation_ids AS text[]), CAST(:public_keys AS text[]),
                    CAST(:reply_partitions AS integer[]), CAST(:scopes AS text[]))
             WITH ORDINALITY
             AS q (id, site, collector, needs_account, needs_seeds, lease_seconds, wait_seconds,
                   request_id, reply_to, correlation_id, public_key, reply_partition, scope, n)
        -- the line's order (queue_seq) is the order of the arrays
        ORDER BY q.n
        ON CONFLICT (id) DO UPDATE
        SET status = 'QUEUED', queue_seq = nextval('job_queue_seq'),
            wait_deadline = excluded.wait_deadline, lease_seconds = excluded.lease_seconds,
            needs_account = excluded.needs_account, needs_seeds = excluded.needs_seeds,
            request_id = excluded.request_id, reply_to = excluded.reply_to,
            correlation_id = excluded.correlation_id, public_key = excluded.public_key,
            reply_partition = excluded.reply_partition, scope = excluded.scope, lease_token = NULL,
            lease_secret_hash = NULL, lease_expires_at = NULL, account_id = NULL, reason = NULL,
            finished_at = NULL, updated_at = now()
        -- job ids are public (Kafka keys): only the collector that started the job, with the
        -- same key, may start it again
        WHERE j.status = 'EXPIRED' AND j.site = excluded.site
          AND j.collector = excluded.collector AND j.public_key = excluded.public_key
        RETURNING j.*
        """
    )
)


@dataclass(frozen=True, slots=True)
class Queued:
    """A job to queue (``jobs.queue_job``'s arguments)."""

    job_id: str
    site: str
    collector: str
    needs_account: bool
    needs_seeds: int
    lease_seconds: int
    wait_seconds: int
    request_id: str
    reply_to: str
    correlation_id: str
    public_key: str
    reply_partition: int | None
    scope: str | None


async def queue_jobs(conn: Conn, queued: Sequence[Queued]) -> dict[str, Row]:
    """``queue_job`` of many jobs in one statement, in line in the order given (each job once);
    the queued jobs by id. A job not returned exists and was not queued again."""
    rows = await _QUEUE_MANY.rows(
        conn,
        {
            "ids": [q.job_id for q in queued],
            "sites": [q.site for q in queued],
            "collectors": [q.collector for q in queued],
            "needs_account": [q.needs_account for q in queued],
            "needs_seeds": [q.needs_seeds for q in queued],
            "lease_seconds": [q.lease_seconds for q in queued],
            "wait_seconds": [q.wait_seconds for q in queued],
            "request_ids": [q.request_id for q in queued],
            "reply_tos": [q.reply_to for q in queued],
            "correlation_ids": [q.correlation_id for q in queued],
            "public_keys": [q.public_key for q in queued],
            "reply_partitions": [q.reply_partition for q in queued],
            "scopes": [q.scope for q in queued],
        },
    )
    return {row["id"]: row for row in rows}
