"""Retention of finished jobs: jobs that ended long ago are deleted with their grants.

A job is past retention when it is finished (not QUEUED or RUNNING), its ``finished_at`` is older
than the retention period, and no capture refers to it (captures keep their job). The inbox has
its own retention (``inbox.prune``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_PRUNE = text(
    """
    WITH doomed AS (
        SELECT id FROM jobs j
        WHERE j.finished_at < coalesce(CAST(:now AS timestamptz), now())
                              - make_interval(secs => :keep)
          AND j.status NOT IN ('QUEUED', 'RUNNING')
          AND NOT EXISTS (SELECT 1 FROM captures c WHERE c.job_id = j.id)
        ORDER BY j.finished_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    grants AS (
        DELETE FROM job_grants g USING doomed WHERE g.job_id = doomed.id
    )
    DELETE FROM jobs j USING doomed
    WHERE j.id = doomed.id AND j.status NOT IN ('QUEUED', 'RUNNING')
    RETURNING j.id
    """
)


async def prune_finished_jobs(
    conn: AsyncConnection, *, keep_seconds: int, limit: int, now: datetime | None = None
) -> list[str]:
    """Delete up to ``limit`` jobs finished more than ``keep_seconds`` ago, oldest first, and their
    grants; the ids of the deleted jobs.

    The jobs are locked first (FOR UPDATE), so a job queued again meanwhile (an EXPIRED job may
    be) is either passed over (SKIP LOCKED) or already locked here, and never deleted while live.
    """
    result = await conn.execute(_PRUNE, {"keep": keep_seconds, "limit": limit, "now": now})
    return [str(row[0]) for row in result]
