"""Jobs ended from outside their holder: an operator's revoke, a grant that could not be sealed.

Callers hold the site's lock (``sites.lock_site``), as for every statement of ``app.store.jobs``.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row


async def revoke_job(conn: AsyncConnection, job_id: str, reason: str) -> Row | None:
    """RUNNING -> CANCELLED by an operator, whoever holds the lease; None when not RUNNING.

    The row keeps the holder's token, so the caller can release what it held; then
    ``retire_token`` moves the token on.
    """
    result = await conn.execute(
        text(
            """
            UPDATE jobs
            SET status = 'CANCELLED', reason = :reason, finished_at = now(), updated_at = now()
            WHERE id = :id AND status = 'RUNNING'
            RETURNING *, clock_timestamp() AS db_at
            """
        ),
        {"id": job_id, "reason": reason},
    )
    return result.mappings().first()


async def retire_token(conn: AsyncConnection, job_id: str, lease_token: int) -> int | None:
    """A revoked job's token -> a fresh one, so the holder's token never matches it again."""
    result = await conn.execute(
        text(
            """
            UPDATE jobs SET lease_token = nextval('lease_token_seq'), updated_at = now()
            WHERE id = :id AND status = 'CANCELLED' AND lease_token = :token
            RETURNING lease_token
            """
        ),
        {"id": job_id, "token": lease_token},
    )
    return result.scalar()


async def fail_granted_job(
    conn: AsyncConnection, job_id: str, lease_token: int, reason: str
) -> Row | None:
    """RUNNING -> FAILED with ``reason`` for a job whose grant, just made in this transaction,
    could not be sealed to it or opened (the grant's token fences it); None otherwise."""
    result = await conn.execute(
        text(
            """
            UPDATE jobs SET status = 'FAILED', reason = :reason, finished_at = now(),
                            updated_at = now()
            WHERE id = :id AND status = 'RUNNING' AND lease_token = :token
            RETURNING *, clock_timestamp() AS db_at
            """
        ),
        {"id": job_id, "token": lease_token, "reason": reason},
    )
    return result.mappings().first()
