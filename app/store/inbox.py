"""The inbox: one row per request_id, so a redelivered or replayed request is answered once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import RowMapping, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, INTEGER, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True, slots=True)
class Claim:
    """A request to record as seen: its id, job, type, body fingerprint and the position of its
    record on the requests topic (so a redelivery of that very record can be told apart)."""

    request_id: str
    job_id: str
    request_type: str
    fingerprint: str
    partition: int | None = None
    offset: int | None = None


_CLAIM = text(
    """
    INSERT INTO inbox (request_id, job_id, request_type, fingerprint, record_partition,
                       record_offset)
    SELECT CAST(id AS uuid), job_id, request_type, fingerprint, part, position
    FROM unnest(:ids, :job_ids, :types, :fingerprints, :partitions, :offsets)
        AS c (id, job_id, request_type, fingerprint, part, position)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
    """
).bindparams(
    bindparam("ids", type_=ARRAY(TEXT)),
    bindparam("job_ids", type_=ARRAY(TEXT)),
    bindparam("types", type_=ARRAY(TEXT)),
    bindparam("fingerprints", type_=ARRAY(TEXT)),
    bindparam("partitions", type_=ARRAY(INTEGER)),
    bindparam("offsets", type_=ARRAY(BIGINT)),
)


async def claim_requests(conn: AsyncConnection, claims: Sequence[Claim]) -> set[str]:
    """Record requests as seen, in order, in one statement; the ids that were not seen before.

    An id seen before (or earlier in ``claims``) keeps its first row. A concurrent duplicate
    waits on the unique index until the first one's transaction ends, then sees it.
    """
    result = await conn.execute(
        _CLAIM,
        {
            "ids": [c.request_id for c in claims],
            "job_ids": [c.job_id for c in claims],
            "types": [c.request_type for c in claims],
            "fingerprints": [c.fingerprint for c in claims],
            "partitions": [c.partition for c in claims],
            "offsets": [c.offset for c in claims],
        },
    )
    return {str(row[0]) for row in result}


async def seen_request(conn: AsyncConnection, request_id: str) -> RowMapping | None:
    """The inbox row of a request seen before: its fingerprint, the reply it got and the
    position of the record that first claimed it."""
    result = await conn.execute(
        text(
            "SELECT fingerprint, reply_topic, reply, record_partition, record_offset"
            " FROM inbox WHERE request_id = :id"
        ),
        {"id": request_id},
    )
    return result.mappings().first()


async def prune(
    conn: AsyncConnection, *, keep_seconds: int, limit: int, now: datetime | None = None
) -> list[str]:
    """Forget up to ``limit`` requests older than ``keep_seconds``, oldest first; their ids.

    Rows another transaction holds are passed over (SKIP LOCKED) and taken next time.
    """
    result = await conn.execute(
        text(
            """
            DELETE FROM inbox WHERE request_id IN (
                SELECT request_id FROM inbox
                WHERE created_at < coalesce(CAST(:now AS timestamptz), now())
                                   - make_interval(secs => :keep)
                ORDER BY created_at LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            RETURNING request_id
            """
        ),
        {"keep": keep_seconds, "limit": limit, "now": now},
    )
    return [str(row[0]) for row in result]
