"""Bench SQL only: history for the bench (finished jobs with their grants and inbox rows, and
many accounts per site), written set-based (INSERT … SELECT generate_series) so a million jobs
take seconds.

Nothing here runs in the service; `qm bench lease --history N` preloads its own database with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

_JOBS = text(
    """
    WITH job AS (
        INSERT INTO jobs (id, site, collector, status, lease_seconds, lease_token, attempts,
                          request_id, reply_to, correlation_id, created_at, granted_at,
                          finished_at, updated_at)
        SELECT 'history-' || g, (:sites)[1 + g % cardinality(:sites)], 'history', 'SUCCEEDED',
               60, nextval('lease_token_seq'), 1, gen_random_uuid(), 'history.replies',
               'history-' || g, t, t, t + interval '1 second', t + interval '1 second'
        FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g,
             LATERAL (SELECT now() - make_interval(secs => CAST(:span AS float8) * (1 - g::float8 / CAST(:total AS bigint))) AS t) ts
        RETURNING id, site, lease_token, request_id, created_at, finished_at
    ),
    grant_rows AS (
        INSERT INTO job_grants (lease_token, job_id, site, granted_at, ended_at, end_reason)
        SELECT lease_token, id, site, created_at, finished_at, 'SUCCEEDED' FROM job
    )
    INSERT INTO inbox (request_id, job_id, request_type, fingerprint, created_at)
    SELECT request_id, id, 'job.start', 'history', created_at FROM job
    """
).bindparams(bindparam("sites", type_=ARRAY(TEXT)))


async def add_finished_jobs(
    conn: AsyncConnection, sites: Sequence[str], *, first: int, last: int, total: int, span: float
) -> None:
    """Finished jobs ``first``..``last`` of ``total``, one grant and one inbox row each, spread
    over the last ``span`` seconds (job ``total`` finished now), round-robin over ``sites``."""
    await conn.execute(
        _JOBS,
        {"sites": list(sites), "first": first, "last": last, "total": total, "span": span},
    )


async def add_accounts(conn: AsyncConnection, site: str, count: int, sealed_secret: bytes) -> None:
    """``count`` accounts of ``site``, every tenth INACTIVE, the rest ACTIVE, all one secret."""
    await conn.execute(
        text(
            """
            INSERT INTO accounts (site, username, secret, status)
            SELECT :site, 'history' || g || '@' || :site, :secret,
                   CAST(CASE WHEN g % 10 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END AS account_status)
            FROM generate_series(1, CAST(:count AS integer)) AS g
            """
        ),
        {"site": site, "count": count, "secret": sealed_secret},
    )


async def vacuum_analyze(conn: AsyncConnection) -> None:
    """Vacuum (visibility map, hint bits) and fresh statistics for the tables the leasing path
    reads, so the autovacuum of a fresh load does not run, and write WAL, inside a measured run.
    ``conn`` must be in autocommit (VACUUM runs outside a transaction)."""
    for table in ("sites", "accounts", "jobs", "job_grants", "inbox", "outbox"):
        await conn.execute(text(f"VACUUM (ANALYZE) {table}"))


async def wal_lsn(conn: AsyncConnection) -> int:
    """The current WAL position in bytes (what a run's WAL volume is measured against)."""
    result = await conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    return int(result.scalar_one())


async def checkpoint(conn: AsyncConnection) -> None:
    """A checkpoint now: from here on, the first change of each page writes a full-page image
    into the WAL, as after every checkpoint of a running server."""
    await conn.execute(text("CHECKPOINT"))
