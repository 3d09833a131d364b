"""The inbox: one row per request_id, so a redelivered or replayed request is answered once."""

from __future__ import annotations

from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection


async def claim_request(
    conn: AsyncConnection, *, request_id: str, job_id: str, request_type: str, fingerprint: str
) -> bool:
    """Record a request as seen; False if its ``request_id`` was seen before.

    A concurrent duplicate waits here on the unique index until the first one's transaction ends,
    then sees it.
    """
    result = await conn.execute(
        text(
            """
            INSERT INTO inbox (request_id, job_id, request_type, fingerprint)
            VALUES (:request_id, :job_id, :request_type, :fingerprint)
            ON CONFLICT (request_id) DO NOTHING
            RETURNING request_id
            """
        ),
        {
            "request_id": request_id,
            "job_id": job_id,
            "request_type": request_type,
            "fingerprint": fingerprint,
        },
    )
    return result.first() is not None


async def seen_request(conn: AsyncConnection, request_id: str) -> RowMapping | None:
    """The inbox row of a request seen before: its fingerprint and the reply it got."""
    result = await conn.execute(
        text("SELECT fingerprint, reply_topic, reply FROM inbox WHERE request_id = :id"),
        {"id": request_id},
    )
    return result.mappings().first()
