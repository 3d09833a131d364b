"""Jobs: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED | EXPIRED; QUEUED -> TIMED_OUT | CANCELLED.

Callers hold the site's lock (``sites.lock_site``) before any statement here that moves a job
into or out of QUEUED or RUNNING; that is what keeps grants FIFO and the capacity gate exact.
Lock order (docs/design.md): site, inbox, job, account, session, outbox keys.

A lease runs from the moment it is granted: its times come from ``clock_timestamp()``, not from
the transaction's start (``now()``), so time a transaction spent waiting on a lock is not taken
off the holder's lease.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store import budgets, proxies
from app.store.prepared import Prepared, Row

# Used by reapers and tests to move the clock: ``coalesce(:now, now())`` is the database clock
# unless a test passes a time.
NOW = "coalesce(CAST(:now AS timestamptz), now())"


_DESCRIBE = text("SELECT * FROM jobs WHERE id = :id")


async def describe_job(conn: AsyncConnection, job_id: str) -> Row | None:
    """A job as it stands, to explain a transition that did not happen."""
    result = await conn.execute(_DESCRIBE, {"id": job_id})
    return result.mappings().first()


_QUEUE = Prepared(
    text(
        """
        INSERT INTO jobs AS j (id, site, collector, status, needs_account, needs_seeds,
                               lease_seconds, wait_deadline, request_id, reply_to,
                               correlation_id, public_key, reply_partition, scope)
        VALUES (:job_id, :site, :collector, 'QUEUED', :needs_account, :needs_seeds,
                :lease_seconds, now() + make_interval(secs => :wait_seconds),
                :request_id, :reply_to, :correlation_id, :public_key, :reply_partition, :scope)
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


async def queue_job(
    conn: AsyncConnection,
    *,
    job_id: str,
    site: str,
    collector: str,
    needs_account: bool,
    needs_seeds: int,
    lease_seconds: int,
    wait_seconds: int,
    request_id: str,
    reply_to: str,
    correlation_id: str,
    public_key: str,
    reply_partition: int | None = None,
    scope: str | None = None,
) -> Row | None:
    """A new job -> QUEUED, or an EXPIRED one queued again; None if the job exists otherwise.

    An EXPIRED job below its attempt cap may be started again by its collector: the same
    ``collector`` with the same ``public_key`` (the reaper turns a job at its cap into FAILED, so
    EXPIRED here always has attempts left).
    """
    return await _QUEUE.first(
        conn,
        {
            "job_id": job_id,
            "site": site,
            "collector": collector,
            "needs_account": needs_account,
            "needs_seeds": needs_seeds,
            "lease_seconds": lease_seconds,
            "wait_seconds": wait_seconds,
            "request_id": request_id,
            "reply_to": reply_to,
            "correlation_id": correlation_id,
            "public_key": public_key,
            "reply_partition": reply_partition,
            "scope": scope,
        },
    )


_GRANT_NEXT_WAITING = Prepared(
    text(
        f"""
        WITH head AS (
            -- the oldest waiting job of the site: FIFO per site (rule 4). The caller holds the site
            -- lock, so no other transaction is choosing a head for this site at the same time.
            SELECT id, needs_account, scope FROM jobs
            WHERE site = :site AND status = 'QUEUED'
            ORDER BY queue_seq LIMIT 1
        ),
        -- use budgets (app.store.budgets): the site's rules and the grant's clock
        {budgets.POLICY_CTE.strip()},
        -- proxies (app.store.proxies): the proxy an account not pinned yet would get
        {proxies.FREE_PROXY_CTE.strip()},
        acct AS (
            -- a rested account of the site, the one free the longest first; SKIP LOCKED passes over
            -- an account an operator is changing right now
            SELECT a.id, coalesce(a.proxy_id, (SELECT id FROM free_proxy)) AS proxy_id
            FROM accounts a
            WHERE a.site = :site AND a.status = 'ACTIVE' AND a.available_at <= coalesce(CAST(:now AS timestamptz), now())
              AND coalesce((SELECT needs_account FROM head), false)
              -- proxies: its own proxy usable, or a free one (or none where none is required)
              AND {proxies.PROXY_USABLE.strip()}
              -- use budgets: not resting for the head's scope, and under its budget in the window
              AND {budgets.SCOPE_FREE.strip()}
              AND {budgets.WITHIN_BUDGET.strip()}
            ORDER BY a.available_at, a.id LIMIT 1
            FOR UPDATE OF a SKIP LOCKED
        ),
        gate AS (
            -- the capacity gate (rule 3): one more running job only while under capacity, and only
            -- when the head job's need for an account can be met
            UPDATE sites s SET running = running + 1,
                -- use budgets: the site's bucket gives one token
                {budgets.BUCKET_AFTER_GRANT.strip()}
            WHERE slug = :site AND running < capacity
              AND EXISTS (SELECT 1 FROM head)
              AND (NOT (SELECT needs_account FROM head) OR EXISTS (SELECT 1 FROM acct))
              -- use budgets: the site's bucket holds a whole token
              AND {budgets.BUCKET_HAS_TOKEN}
            RETURNING slug, capacity
        ),
        token AS (
            -- the fencing token: it only ever grows, so an old holder's token never matches again;
            -- and the lease's start, read from the clock now that every lock is held
            SELECT nextval('lease_token_seq') AS value,
                   coalesce(CAST(:now AS timestamptz), clock_timestamp()) AS at
            FROM gate
        ),
        job AS (
            UPDATE jobs j
            SET status = 'RUNNING', lease_token = token.value, lease_secret_hash = :secret_hash,
                lease_expires_at = token.at + make_interval(secs => j.lease_seconds),
                account_id = (SELECT id FROM acct), attempts = j.attempts + 1,
                granted_at = token.at, updated_at = now()
            FROM head, token
            WHERE j.id = head.id AND j.status = 'QUEUED'
            RETURNING j.*
        ),
        account AS (
            UPDATE accounts a
            SET status = 'USING', holder_job_id = job.id, lease_token = job.lease_token,
                lease_expires_at = job.lease_expires_at, use_count = a.use_count + 1,
                -- proxies: pinned on its first grant, kept after
                proxy_id = acct.proxy_id,
                updated_at = now()
            FROM job, acct
            WHERE a.id = job.account_id AND a.status = 'ACTIVE'
            RETURNING a.id, a.username, a.secret, a.proxy_id
        ),
        history AS (
            -- the grant history, read by operators and by the exclusivity checks of the tests
            INSERT INTO job_grants (lease_token, job_id, site, account_id, granted_at, scope,
                                    proxy_id)
            SELECT lease_token, id, site, account_id, granted_at, scope,
                   (SELECT proxy_id FROM account) FROM job
        )
        -- the grant's message needs the account's sealed secret and stored session; more_waiting
        -- tells the caller whether another job waits behind this one (the snapshot still sees the
        -- head as QUEUED, hence the id test)
        -- db_at and capacity: the grant's clock and the capacity in force, for its event (audit)
        SELECT job.*, job.granted_at AS db_at, (SELECT capacity FROM gate) AS capacity,
               account.username AS account_username, account.secret AS account_secret,
               ses.version AS session_version, ses.storage_state AS session_state,
               px.id AS proxy_id, px.label AS proxy_label, px.url_sealed AS proxy_url,
               (SELECT session_check_url FROM sites WHERE slug = :site) AS session_check_url,
               EXISTS (SELECT 1 FROM jobs w WHERE w.site = :site AND w.status = 'QUEUED'
                       AND w.id <> job.id) AS more_waiting
        FROM job LEFT JOIN account ON true LEFT JOIN sessions ses ON ses.account_id = account.id
             LEFT JOIN proxies px ON px.id = account.proxy_id
        """
    )
)


async def grant_next_waiting(
    conn: AsyncConnection, site: str, secret_hash: bytes, now: datetime | None = None
) -> Row | None:
    """The site's oldest QUEUED job -> RUNNING, with an account ACTIVE -> USING if it needs one.

    One statement: pick the head, pick an account, take the capacity gate, grant; the lease
    keeps ``secret_hash``, the hash of the secret its grant carries. None when the
    site has no waiting job, no free capacity, or no rested account for the head job. The row
    also carries the account's sealed secret and session (``account_secret``,
    ``session_version``, ``session_state``), the site's ``session_check_url``,
    ``more_waiting``, and the account's proxy (``proxy_id``, ``proxy_label``, ``proxy_url``
    sealed at rest): pinned by its first grant to the least-loaded free proxy, kept after.
    """
    return await _GRANT_NEXT_WAITING.first(
        conn, {"site": site, "now": now, "secret_hash": secret_hash}
    )


_QUEUE_POSITION = text(
    """
    SELECT count(*) FROM jobs w, jobs me
    WHERE me.id = :id AND w.site = me.site AND w.status = 'QUEUED'
      AND w.queue_seq <= me.queue_seq
    """
)


async def queue_position(conn: AsyncConnection, job_id: str) -> int:
    """1 for the next job to be granted on its site."""
    result = await conn.execute(
        _QUEUE_POSITION,
        {"id": job_id},
    )
    return int(result.scalar_one())


_EXTEND = Prepared(
    text(
        """
        WITH job AS (
            UPDATE jobs
            SET lease_expires_at = greatest(
                    lease_expires_at,
                    clock_timestamp() + make_interval(secs => coalesce(:extend, lease_seconds))),
                updated_at = now()
            WHERE id = :id AND status = 'RUNNING' AND lease_token = :token
              AND lease_secret_hash = :secret_hash AND lease_expires_at > clock_timestamp()
            RETURNING id, site, status, account_id, lease_token, lease_expires_at,
                      clock_timestamp() AS db_at
        ),
        account AS (
            -- the account's lease follows the job's
            UPDATE accounts a SET lease_expires_at = job.lease_expires_at
            FROM job WHERE a.holder_job_id = job.id AND a.lease_token = job.lease_token
            RETURNING a.id
        )
        SELECT job.* FROM job
        """
    )
)


async def extend_lease(
    conn: AsyncConnection,
    job_id: str,
    lease_token: int,
    secret_hash: bytes | None,
    extend_seconds: int | None,
) -> Row | None:
    """RUNNING -> RUNNING with a later expiry, for the holder of a live lease only (its token
    and the hash of its secret)."""
    return await _EXTEND.first(
        conn,
        {"id": job_id, "token": lease_token, "secret_hash": secret_hash, "extend": extend_seconds},
    )


_FINISH = Prepared(
    text(
        """
        UPDATE jobs j
        SET status = CAST(:status AS job_status), reason = :reason,
            finished_at = now(), updated_at = now()
        WHERE id = :id AND status = 'RUNNING' AND lease_token = :token
          AND lease_secret_hash = :secret_hash AND lease_expires_at > clock_timestamp()
        RETURNING j.*, clock_timestamp() AS db_at,
                  EXISTS (SELECT 1 FROM jobs w WHERE w.site = j.site AND w.status = 'QUEUED')
                      AS has_waiting
        """
    )
)


async def finish_job(
    conn: AsyncConnection,
    job_id: str,
    lease_token: int,
    secret_hash: bytes | None,
    status: str,
    reason: str | None,
) -> Row | None:
    """RUNNING -> SUCCEEDED | FAILED, for the holder of a live lease only (its token and the
    hash of its secret).

    The row also says whether jobs wait on its site (``has_waiting``), as they stand under the
    site's lock, which the caller holds.
    """
    return await _FINISH.first(
        conn,
        {
            "id": job_id,
            "token": lease_token,
            "secret_hash": secret_hash,
            "status": status,
            "reason": reason,
        },
    )


_CANCEL = text(
    """
    WITH before AS (
        -- the row is locked here, so ``was`` is the status this update replaces
        SELECT id, status FROM jobs WHERE id = :id FOR UPDATE
    )
    UPDATE jobs j
    SET status = 'CANCELLED', reason = 'cancelled', finished_at = now(), updated_at = now()
    FROM before
    WHERE j.id = before.id
      AND ((j.status = 'QUEUED' AND j.public_key = :public_key)
           OR (j.status = 'RUNNING' AND j.lease_token = :token
               AND j.lease_secret_hash = :secret_hash
               AND j.lease_expires_at > clock_timestamp()))
    RETURNING j.*, before.status AS was, clock_timestamp() AS db_at
    """
)


async def cancel_job(
    conn: AsyncConnection,
    job_id: str,
    lease_token: int | None,
    secret_hash: bytes | None,
    public_key: str | None,
) -> Row | None:
    """QUEUED -> CANCELLED only for its requester (the ``public_key`` its start named);
    RUNNING -> CANCELLED only for the holder of the live lease (its token and the hash of its
    secret).

    Returns the job with ``was`` (its status before); None when nothing changed.
    """
    result = await conn.execute(
        _CANCEL,
        {"id": job_id, "token": lease_token, "secret_hash": secret_hash, "public_key": public_key},
    )
    return result.mappings().first()


async def reject_waiting_job(
    conn: AsyncConnection, job_id: str, reason: str, now: datetime | None = None
) -> Row | None:
    """QUEUED -> TIMED_OUT with a reason (its wait ran out, or it could not wait at all)."""
    result = await conn.execute(
        text(
            f"""
            UPDATE jobs SET status = 'TIMED_OUT', reason = :reason, finished_at = {NOW},
                            updated_at = now()
            WHERE id = :id AND status = 'QUEUED'
            RETURNING *
            """
        ),
        {"id": job_id, "reason": reason, "now": now},
    )
    return result.mappings().first()


_RELEASE = Prepared(
    text(
        """
        WITH account AS (
            UPDATE accounts
            -- health: the site's retire_after_blocks-th block in a row retires the account
            SET status = CASE WHEN NOT :blocked THEN 'ACTIVE'
                              WHEN consecutive_blocks + 1 >= :retire_after THEN 'INACTIVE'
                              ELSE 'BLOCKED' END::account_status,
                -- health: blocks and errors in a row, forgotten by a success
                consecutive_blocks = CASE WHEN :blocked THEN consecutive_blocks + 1
                                          WHEN :outcome = 'succeeded' THEN 0
                                          ELSE consecutive_blocks END,
                consecutive_errors = CASE WHEN :failed THEN consecutive_errors + 1
                                          WHEN :outcome = 'succeeded' THEN 0
                                          ELSE consecutive_errors END,
                holder_job_id = NULL,
                lease_expires_at = NULL,
                available_at = now() + make_interval(secs => :rest),
                error_count = error_count + CASE WHEN :failed OR :blocked THEN 1 ELSE 0 END,
                blocked_reason = CASE
                    WHEN :blocked AND consecutive_blocks + 1 >= :retire_after
                    THEN format('retired after %s blocks in a row: %s', consecutive_blocks + 1,
                                coalesce(CAST(:reason AS text), 'no reason given'))
                    WHEN :blocked THEN :reason ELSE blocked_reason END,
                -- a block with a rest ends by itself (the block-cooldowns sweep); without
                -- one it stays until an operator acts
                blocked_until = CASE WHEN :blocked AND :rest > 0
                                      AND consecutive_blocks + 1 < :retire_after
                                     THEN now() + make_interval(secs => :rest) END,
                updated_at = now()
            WHERE id = :account_id AND status = 'USING'
              AND holder_job_id = :job_id AND lease_token = :lease_token
            RETURNING id, site, status, available_at, proxy_id, consecutive_blocks
        ),
        slot AS (
            UPDATE sites SET running = running - 1 WHERE slug = :site AND running > 0
        ),
        grant_ended AS (
            UPDATE job_grants SET ended_at = now(), end_reason = :outcome
            WHERE lease_token = :lease_token AND ended_at IS NULL
        )
        -- this statement starts after the job's row was locked by its transition, so it sees every
        -- seed a claim of this lease took before (the claim fences the job with FOR SHARE)
        SELECT account.*,
               EXISTS (SELECT 1 FROM seeds s WHERE s.holder_job_id = :job_id
                       AND s.lease_token = :lease_token AND s.status = 'ASSIGNED') AS holds_seeds
        FROM (SELECT 1) AS one LEFT JOIN account ON true
        """
    )
)


async def release_lease(
    conn: AsyncConnection,
    *,
    job: Row,
    lease_token: int,
    outcome: str,
    blocked: bool,
    failed: bool,
    rest_seconds: int,
    reason: str | None,
    retire_after_blocks: int | None = None,
) -> tuple[Row | None, bool]:
    """A lease ends: its account USING -> ACTIVE | BLOCKED (resting ``rest_seconds``, only for
    the holder's ``lease_token``), its site's running slot back, its grant closed with ``outcome``.
    A block with ``rest_seconds`` > 0 ends by itself then (``blocked_until``); the
    ``retire_after_blocks``-th block in a row (the site's rule, read under its lock) retires the
    account instead (USING -> INACTIVE).

    One statement; returns the account as released (None when the job held none) and whether
    the lease still holds seeds (to settle them; the caller holds the job's row).
    """
    row = await _RELEASE.first(
        conn,
        {
            "account_id": job["account_id"],
            "job_id": job["id"],
            "lease_token": lease_token,
            "site": job["site"],
            "outcome": outcome,
            "blocked": blocked,
            "failed": failed,
            "rest": rest_seconds,
            "reason": reason,
            # no rule: no count of blocks reaches it
            "retire_after": retire_after_blocks or 2**31 - 1,
        },
    )
    assert row is not None  # one row, with or without an account
    return (row if row["id"] is not None else None), bool(row["holds_seeds"])
