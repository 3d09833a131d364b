"""The sweeps' statements on jobs: pages of lapsed leases and overdue waits, and their
transitions, each repeating its staleness test in its WHERE (``app.store.jobs`` holds the
transitions requests make; the same lock order holds here)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.jobs import NOW
from app.store.rows import Row


async def find_expired_leases(
    conn: AsyncConnection, *, now: datetime | None, after: str, limit: int
) -> list[Row]:
    """A page (by id) of RUNNING jobs whose lease has passed."""
    result = await conn.execute(
        text(
            f"""
            SELECT id, site, lease_token FROM jobs
            WHERE status = 'RUNNING' AND lease_expires_at < {NOW} AND id > :after
              AND granted_at IS NOT NULL  -- always true; names jobs_lease_expiry's predicate
            ORDER BY id LIMIT :limit
            """
        ),
        {"now": now, "after": after, "limit": limit},
    )
    return list(result.mappings())


async def expire_job(
    conn: AsyncConnection,
    job_id: str,
    lease_token: int,
    max_attempts: int,
    now: datetime | None = None,
) -> Row | None:
    """RUNNING -> EXPIRED, or -> FAILED (attempts_exhausted) at the attempt cap.

    The staleness test is repeated here: a heartbeat that extended the lease since the page was
    read, or a finish, makes this a no-op.
    """
    result = await conn.execute(
        text(
            f"""
            UPDATE jobs
            SET status = CASE WHEN attempts >= :max_attempts THEN 'FAILED' ELSE 'EXPIRED' END::job_status,
                reason = CASE WHEN attempts >= :max_attempts THEN 'attempts_exhausted'
                              ELSE 'lease_expired' END,
                finished_at = {NOW}, updated_at = now()
            WHERE id = :id AND status = 'RUNNING' AND lease_token = :token
              AND lease_expires_at < {NOW}
            RETURNING *, coalesce(CAST(:now AS timestamptz), clock_timestamp()) AS db_at
            """
        ),
        {"id": job_id, "token": lease_token, "max_attempts": max_attempts, "now": now},
    )
    return result.mappings().first()


async def find_overdue_waiting(
    conn: AsyncConnection, *, now: datetime | None, after: str, limit: int
) -> list[Row]:
    """A page (by id) of QUEUED jobs past their wait deadline."""
    result = await conn.execute(
        text(
            f"""
            SELECT id, site FROM jobs
            WHERE status = 'QUEUED' AND wait_deadline < {NOW} AND id > :after
            ORDER BY id LIMIT :limit
            """
        ),
        {"now": now, "after": after, "limit": limit},
    )
    return list(result.mappings())


async def time_out_waiting_job(
    conn: AsyncConnection, job_id: str, now: datetime | None = None
) -> Row | None:
    """QUEUED -> TIMED_OUT, only while its wait deadline has passed (repeated staleness test)."""
    result = await conn.execute(
        text(
            f"""
            UPDATE jobs SET status = 'TIMED_OUT', reason = 'timed_out', finished_at = {NOW},
                            updated_at = now()
            WHERE id = :id AND status = 'QUEUED' AND wait_deadline < {NOW}
            RETURNING *
            """
        ),
        {"id": job_id, "now": now},
    )
    return result.mappings().first()


async def oldest_waiters(conn: AsyncConnection, older_than_seconds: float) -> list[Row]:
    """Sites whose oldest waiting job has waited longer than ``older_than_seconds`` (by the
    database clock): slug, how many wait, and the oldest wait in seconds."""
    result = await conn.execute(
        text(
            """
            SELECT site, count(*) AS waiting,
                   extract(epoch FROM now() - min(created_at))::float8 AS oldest_seconds
            FROM jobs WHERE status = 'QUEUED'
            GROUP BY site
            HAVING now() - min(created_at) > make_interval(secs => :older_than)
            ORDER BY site
            """
        ),
        {"older_than": older_than_seconds},
    )
    return list(result.mappings())
