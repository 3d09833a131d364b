"""The inbox: one row per request_id, so a redelivered or replayed request is answered once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, INTEGER, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row


@dataclass(frozen=True, slots=True)
class Claim:
    """A request to record as seen: its id, job, type, body fingerprint and where its record
    was read (topic, partition, offset and the record's timestamp), so a redelivery of that very
    record can be told apart, even from a retry at the same place of a topic made again."""

    request_id: str
    job_id: str
    request_type: str
    fingerprint: str
    partition: int | None = None
    offset: int | None = None
    topic: str | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """What the first statement of a request transaction found: the request ids not seen
    before, the sites it locked (each row as ``sites.lock_site`` gives it, without
    ``has_waiting``) and the site of each named job that exists."""

    fresh: set[str]
    sites: dict[str, Row]
    job_sites: dict[str, str]


_CLAIM = text(
    """
    WITH locked AS MATERIALIZED (
        -- the first locks of the transaction (lock order): the sites, in slug order
        SELECT s.*,
               (SELECT min(a.available_at) FROM accounts a
                WHERE a.site = s.slug AND a.status <> 'INACTIVE') IS NOT NULL AS has_accounts,
               ARRAY(SELECT j.id FROM jobs j WHERE j.id = ANY(:job_ids) AND j.site = s.slug)
                   AS job_ids
        FROM sites s
        WHERE s.slug = ANY(:slugs) OR s.slug IN (SELECT site FROM jobs WHERE id = ANY(:job_ids))
        ORDER BY s.slug FOR UPDATE OF s
    ),
    claimed AS (
        -- then the inbox rows; the sub-select makes every site lock come first
        INSERT INTO inbox (request_id, job_id, request_type, fingerprint, record_partition,
                           record_offset, record_topic, record_timestamp)
        SELECT CAST(c.id AS uuid), c.job_id, c.request_type, c.fingerprint, c.part, c.position,
               c.topic, c.stamp
        FROM unnest(:ids, :claim_job_ids, :types, :fingerprints, :partitions, :offsets,
                    :topics, :timestamps)
             AS c (id, job_id, request_type, fingerprint, part, position, topic, stamp)
        WHERE (SELECT count(*) FROM locked) >= 0
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id
    )
    SELECT (SELECT array_agg(CAST(request_id AS text)) FROM claimed) AS fresh, locked.*
    FROM (SELECT 1) AS one LEFT JOIN locked ON true
    """
).bindparams(
    bindparam("slugs", type_=ARRAY(TEXT)),
    bindparam("job_ids", type_=ARRAY(TEXT)),
    bindparam("ids", type_=ARRAY(TEXT)),
    bindparam("claim_job_ids", type_=ARRAY(TEXT)),
    bindparam("types", type_=ARRAY(TEXT)),
    bindparam("fingerprints", type_=ARRAY(TEXT)),
    bindparam("partitions", type_=ARRAY(INTEGER)),
    bindparam("offsets", type_=ARRAY(BIGINT)),
    bindparam("topics", type_=ARRAY(TEXT)),
    bindparam("timestamps", type_=ARRAY(BIGINT)),
)


async def claim_requests(
    conn: AsyncConnection,
    claims: Sequence[Claim],
    *,
    slugs: Sequence[str] = (),
    job_ids: Sequence[str] = (),
) -> Claimed:
    """Lock the named sites and the sites of the named jobs, in slug order, then record the
    requests as seen, in order: one statement, the first of a request transaction.

    Locking every site a transaction works on at once and in one order means two such
    transactions cannot deadlock on each other's sites. An id seen before (or earlier in
    ``claims``) keeps its first row. A concurrent duplicate waits on the unique index until the
    first one's transaction ends, then sees it.
    """
    result = await conn.execute(
        _CLAIM,
        {
            "slugs": list(slugs),
            "job_ids": list(job_ids),
            "ids": [c.request_id for c in claims],
            "claim_job_ids": [c.job_id for c in claims],
            "types": [c.request_type for c in claims],
            "fingerprints": [c.fingerprint for c in claims],
            "partitions": [c.partition for c in claims],
            "offsets": [c.offset for c in claims],
            "topics": [c.topic for c in claims],
            "timestamps": [c.timestamp_ms for c in claims],
        },
    )
    rows = result.mappings().all()
    sites: dict[str, Row] = {row["slug"]: row for row in rows if row["slug"] is not None}
    return Claimed(
        fresh=set(rows[0]["fresh"] or ()),
        sites=sites,
        job_sites={job_id: slug for slug, row in sites.items() for job_id in row["job_ids"]},
    )


_SEEN = text(
    "SELECT fingerprint, reply_topic, reply, record_partition, record_offset, record_topic,"
    " record_timestamp FROM inbox WHERE request_id = :id"
)


async def seen_request(conn: AsyncConnection, request_id: str) -> Row | None:
    """The inbox row of a request seen before: its fingerprint, the reply it got and where the
    record that first claimed it was read."""
    result = await conn.execute(_SEEN, {"id": request_id})
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
