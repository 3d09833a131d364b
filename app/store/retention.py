"""Retention of history: finished jobs that ended long ago are deleted with their grants and
delivered captures, and ended seed holds with them.

A job is past retention when it is finished (not QUEUED or RUNNING), its ``finished_at`` is older
than the retention period, and every capture it made was delivered (HANDED_OFF) before that too: a
capture still being handed off, or FAILED (an operator may retry it), keeps its job. The inbox has
its own retention (``inbox.prune``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_CUTOFF = "coalesce(CAST(:now AS timestamptz), now()) - make_interval(secs => :keep)"

_PRUNE = text(
    f"""
    WITH doomed AS (
        SELECT id FROM jobs j
        WHERE j.finished_at < {_CUTOFF}
          AND j.status NOT IN ('QUEUED', 'RUNNING')
          AND NOT EXISTS (SELECT 1 FROM captures c WHERE c.job_id = j.id
                          AND NOT (c.status = 'HANDED_OFF' AND c.handed_off_at < {_CUTOFF}))
        ORDER BY j.finished_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    delivered AS (
        -- HANDED_OFF is final: no statement changes such a capture, so all of them go
        DELETE FROM captures c USING doomed
        WHERE c.job_id = doomed.id AND c.status = 'HANDED_OFF' AND c.handed_off_at < {_CUTOFF}
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
    """Delete up to ``limit`` jobs finished more than ``keep_seconds`` ago, oldest first, with
    their grants and delivered captures; the ids of the deleted jobs.

    The jobs are locked first (FOR UPDATE), so a job queued again meanwhile (an EXPIRED job may
    be) is either passed over (SKIP LOCKED) or already locked here, and never deleted while live.
    """
    result = await conn.execute(_PRUNE, {"keep": keep_seconds, "limit": limit, "now": now})
    return [str(row[0]) for row in result]


_PRUNE_HOLDS = text(
    f"""
    WITH page AS (
        SELECT id FROM seeds WHERE id > :after ORDER BY id LIMIT :limit
    ),
    gone AS (
        DELETE FROM seed_assignments a USING page
        WHERE a.seed_id = page.id AND a.ended_at < {_CUTOFF}
        RETURNING a.seed_id
    )
    SELECT (SELECT max(id) FROM page) AS last, (SELECT count(*) FROM gone) AS deleted
    """
)


async def prune_seed_holds(
    conn: AsyncConnection, *, keep_seconds: int, after: int, limit: int, now: datetime | None = None
) -> tuple[int | None, int]:
    """Delete the holds that ended more than ``keep_seconds`` ago of the ``limit`` seeds after
    seed ``after`` (by id); the last seed id of that page (None: no seed after ``after``) and
    how many holds went.

    Seeds are walked by their key, not the holds by their end (which no index orders: one would
    cost every claim and settle a write), so a statement reads at most ``limit`` seeds' holds;
    a hold still open is never deleted.
    """
    row = (
        await conn.execute(
            _PRUNE_HOLDS, {"keep": keep_seconds, "after": after, "limit": limit, "now": now}
        )
    ).one()
    return (None if row.last is None else int(row.last)), int(row.deleted)
