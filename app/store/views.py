"""Read-only queries for operators (`qm sites list`, `qm jobs …`, `qm top`): nothing here writes."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.accounts import HEALTH
from app.store.rows import Row

_SITE_OVERVIEW = text(
    """
    SELECT s.*,
           coalesce(a.ready, 0) AS accounts_ready, coalesce(a.resting, 0) AS accounts_resting,
           coalesce(a.using, 0) AS accounts_using, coalesce(a.blocked, 0) AS accounts_blocked,
           coalesce(a.inactive, 0) AS accounts_inactive,
           w.waiting,
           -- a waiting job's updated_at is when it was (last) queued: nothing else touches it
           extract(epoch FROM now() - w.oldest)::float8 AS oldest_wait_seconds,
           g.grants_last_minute,
           (SELECT coalesce(jsonb_object_agg(h.health, h.n), '{}') FROM (
                SELECT @HEALTH AS health, count(*) AS n FROM accounts a
                WHERE a.site = s.slug GROUP BY 1) h) AS health
    FROM sites s
    LEFT JOIN LATERAL (
        -- an ACTIVE account still resting after its last use is not ready to be granted
        SELECT count(*) FILTER (WHERE status = 'ACTIVE' AND available_at <= now()) AS ready,
               count(*) FILTER (WHERE status = 'ACTIVE' AND available_at > now())  AS resting,
               count(*) FILTER (WHERE status = 'USING')    AS using,
               count(*) FILTER (WHERE status = 'BLOCKED')  AS blocked,
               count(*) FILTER (WHERE status = 'INACTIVE') AS inactive
        FROM accounts WHERE site = s.slug
    ) a ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS waiting, min(updated_at) AS oldest
        FROM jobs WHERE site = s.slug AND status = 'QUEUED'
    ) w ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS grants_last_minute FROM job_grants
        WHERE site = s.slug AND granted_at > now() - interval '1 minute'
    ) g ON true
    WHERE CAST(:site AS text) IS NULL OR s.slug = :site
    ORDER BY s.slug
    """.replace("@HEALTH", HEALTH)
)


async def site_overview(conn: AsyncConnection, site: str | None = None) -> list[Row]:
    """Every site (or one) with its running and waiting jobs, accounts by state, grant rate."""
    result = await conn.execute(_SITE_OVERVIEW, {"site": site})
    return list(result.mappings())


async def list_jobs(
    conn: AsyncConnection,
    *,
    site: str | None,
    status: str | None,
    collector: str | None,
    limit: int,
) -> list[Row]:
    """Jobs, running and waiting first (waiting ones in grant order), then the latest finished."""
    result = await conn.execute(
        text(
            """
            SELECT j.id, j.site, j.collector, j.status, j.attempts, j.created_at, j.updated_at,
                   j.granted_at, j.finished_at, j.lease_expires_at, j.wait_deadline, j.reason,
                   a.username AS account, now() AS now,
                   CASE WHEN j.status = 'QUEUED' THEN
                       (SELECT count(*) FROM jobs w WHERE w.site = j.site AND w.status = 'QUEUED'
                                                      AND w.queue_seq <= j.queue_seq)
                   END AS position
            FROM jobs j LEFT JOIN accounts a ON a.id = j.account_id
            WHERE (CAST(:site AS text) IS NULL OR j.site = :site)
              AND (CAST(:status AS text) IS NULL OR j.status = CAST(:status AS job_status))
              AND (CAST(:collector AS text) IS NULL OR j.collector = :collector)
            ORDER BY j.status = 'RUNNING' DESC, j.status = 'QUEUED' DESC,
                     CASE WHEN j.status = 'QUEUED' THEN j.queue_seq END, j.updated_at DESC, j.id
            LIMIT :limit
            """
        ),
        {"site": site, "status": status, "collector": collector, "limit": limit},
    )
    return list(result.mappings())


async def job_detail(conn: AsyncConnection, job_id: str) -> Row | None:
    """One job with its account's name and, while it waits, what stands in its way.

    ``ahead``: waiting jobs of its site granted before it. The account columns describe the
    site's accounts now: ready ones, and when the soonest resting, held or blocked one frees.
    """
    result = await conn.execute(
        text(
            """
            SELECT j.*, a.username AS account_username, now() AS now,
                   s.capacity, s.running, s.paused_capacity,
                   (SELECT count(*) FROM jobs w WHERE w.site = j.site AND w.status = 'QUEUED'
                                                  AND w.queue_seq < j.queue_seq) AS ahead,
                   acc.*
            FROM jobs j
            JOIN sites s ON s.slug = j.site
            LEFT JOIN accounts a ON a.id = j.account_id
            CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE x.status = 'ACTIVE' AND x.available_at <= now())
                           AS accounts_ready,
                       count(*) FILTER (WHERE x.status <> 'INACTIVE') AS accounts_usable,
                       count(*) FILTER (WHERE x.status = 'BLOCKED' AND x.blocked_until IS NULL)
                           AS accounts_blocked_for_operator,
                       min(x.available_at) FILTER (WHERE x.status = 'ACTIVE'
                                                     AND x.available_at > now()) AS next_rested_at,
                       min(x.lease_expires_at) FILTER (WHERE x.status = 'USING') AS next_lease_end,
                       min(x.blocked_until) FILTER (WHERE x.status = 'BLOCKED') AS next_block_end
                FROM accounts x WHERE x.site = j.site
            ) acc
            WHERE j.id = :id
            """
        ),
        {"id": job_id},
    )
    return result.mappings().first()


async def job_grants(conn: AsyncConnection, job_id: str) -> list[Row]:
    """Every lease the job was granted, oldest first, with the account's name."""
    result = await conn.execute(
        text(
            """
            SELECT g.lease_token, g.granted_at, g.ended_at, g.end_reason, g.account_id,
                   a.username AS account_username
            FROM job_grants g LEFT JOIN accounts a ON a.id = g.account_id
            WHERE g.job_id = :id ORDER BY g.lease_token
            """
        ),
        {"id": job_id},
    )
    return list(result.mappings())


async def reaper_repairs(conn: AsyncConnection, minutes: int) -> Row:
    """What the reapers repaired in the last ``minutes``: leases expired, waits timed out."""
    result = await conn.execute(
        text(
            """
            SELECT
                (SELECT count(*) FROM job_grants WHERE end_reason = 'expired'
                    AND ended_at > now() - make_interval(mins => :m)) AS leases_expired,
                (SELECT count(*) FROM jobs WHERE status = 'TIMED_OUT' AND reason = 'timed_out'
                    AND finished_at > now() - make_interval(mins => :m)) AS waits_timed_out,
                (SELECT count(*) FROM jobs WHERE status = 'FAILED'
                    AND reason = 'attempts_exhausted'
                    AND finished_at > now() - make_interval(mins => :m)) AS attempts_exhausted
            """
        ),
        {"m": minutes},
    )
    return result.mappings().one()
