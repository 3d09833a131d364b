"""Captures: RECEIVED -> HANDING_OFF -> HANDED_OFF; HANDING_OFF -> RECEIVED (retry) | FAILED.

A capture's handoff is a lease like a job's: the claim takes a fresh fencing token
(``lease_token_seq``), names its holder and an expiry; only that token can finish the handoff.
``next_attempt_at`` is when the next attempt may start (the retry backoff); ``dispatched_at`` is
when the record that starts it was written to the outbox (NULL: none is in flight).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.jobs import NOW
from app.store.prepared import Prepared
from app.store.rows import Row

# What the handoff worker needs besides the capture: where the site wants it delivered.
_WITH_SITE = """
    SELECT c.*, s.webhook_shown, s.webhook_sealed, s.dag_id FROM c JOIN sites s ON s.slug = c.site
"""


_ADD = Prepared(
    text(
        """
        WITH live AS (
            -- fencing (rule 2): only the holder of the job's live lease hands in captures.
            -- FOR SHARE waits for a finish, cancel or expiry of the job in flight and then
            -- tests the job again, so no capture joins a job that ended first.
            SELECT id, site FROM jobs
            WHERE id = :job_id AND status = 'RUNNING' AND lease_token = :token
              AND lease_secret_hash = :secret_hash AND lease_expires_at > clock_timestamp()
            FOR SHARE
        )
        INSERT INTO captures (id, job_id, site, url, storage_uri, sha256, content_type, size,
                              captured_at, meta, fingerprint, dispatched_at)
        SELECT :id, live.id, live.site, :url, :storage_uri, :sha256, :content_type, :size,
               :captured_at, CAST(:meta AS jsonb), :fingerprint, now()
        FROM live
        ON CONFLICT (id) DO NOTHING
        RETURNING *
        """
    )
)


async def add_capture(
    conn: AsyncConnection,
    *,
    capture_id: str,
    job_id: str,
    lease_token: int,
    secret_hash: bytes | None,
    url: str,
    storage_uri: str,
    sha256: str,
    content_type: str,
    size: int,
    captured_at: datetime,
    meta: dict[str, Any],
    fingerprint: str,
) -> Row | None:
    """A new capture -> RECEIVED, dispatched now; only for the holder of the job's live lease
    (its token and the hash of its secret).

    None when the lease is not live or the capture id exists (``describe_capture`` says which).
    """
    return await _ADD.first(
        conn,
        {
            "id": capture_id,
            "job_id": job_id,
            "token": lease_token,
            "secret_hash": secret_hash,
            "url": url,
            "storage_uri": storage_uri,
            "sha256": sha256,
            "content_type": content_type,
            "size": size,
            "captured_at": captured_at,
            "meta": json.dumps(meta),
            "fingerprint": fingerprint,
        },
    )


async def describe_capture(conn: AsyncConnection, capture_id: str) -> Row | None:
    """A capture as it stands, with its site's delivery settings."""
    result = await conn.execute(
        text(f"WITH c AS (SELECT * FROM captures WHERE id = :id) {_WITH_SITE}"), {"id": capture_id}
    )
    return result.mappings().first()


# A claim names its captures by id: the primary key finds them, whatever the statistics say.
# Their status is compared as text, a test the planner cannot match to captures_due's predicate
# (status = 'RECEIVED'): analyzed while few captures waited (over a large delivered history, and
# autoanalyze waits for a tenth of the table to change), it would walk that index, every due
# capture of a backlog, filtering on id (1.2 s for two captures behind 50,000 on 10 million).
_RECEIVED = "CAST(status AS text) = 'RECEIVED'"


async def claim_handoff(
    conn: AsyncConnection,
    capture_id: str,
    *,
    holder: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> Row | None:
    """RECEIVED -> HANDING_OFF with a fresh token, once its attempt is due; None: not due, or a
    peer (or a duplicate record) took it first."""
    result = await conn.execute(
        text(
            f"""
            WITH c AS (
                UPDATE captures
                SET status = 'HANDING_OFF', handoff_holder = :holder,
                    handoff_token = nextval('lease_token_seq'),
                    handoff_expires_at = {NOW} + make_interval(secs => :lease),
                    dispatched_at = NULL, updated_at = now()
                WHERE id = :id AND {_RECEIVED} AND next_attempt_at <= {NOW}
                RETURNING *
            )
            {_WITH_SITE}
            """
        ),
        {"id": capture_id, "holder": holder, "lease": lease_seconds, "now": now},
    )
    return result.mappings().first()


_CLAIM_HANDOFFS = text(
    f"""
    WITH picked AS (
        SELECT id FROM captures
        WHERE id = ANY(CAST(:ids AS text[])) AND {_RECEIVED}
          AND next_attempt_at <= {NOW}
        ORDER BY id
        FOR UPDATE
    ),
    c AS (
        UPDATE captures
        SET status = 'HANDING_OFF', handoff_holder = :holder,
            handoff_token = nextval('lease_token_seq'),
            handoff_expires_at = {NOW} + make_interval(secs => :lease),
            dispatched_at = NULL, updated_at = now()
        FROM picked
        WHERE captures.id = picked.id AND CAST(captures.status AS text) = 'RECEIVED'
        RETURNING captures.*
    )
    {_WITH_SITE}
    """
)


async def claim_handoffs(
    conn: AsyncConnection,
    capture_ids: Sequence[str],
    *,
    holder: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[Row]:
    """RECEIVED -> HANDING_OFF for each of ``capture_ids`` whose attempt is due, each with a
    fresh token, in one statement. Rows are locked in id order, so two batches never deadlock;
    a capture a peer is claiming is waited for and, once the peer committed, is no longer
    RECEIVED (the lock re-reads it), so only one of them claims it."""
    result = await conn.execute(
        _CLAIM_HANDOFFS,
        {"ids": list(capture_ids), "holder": holder, "lease": lease_seconds, "now": now},
    )
    return list(result.mappings())


async def finish_handoffs(
    conn: AsyncConnection, claims: Sequence[tuple[str, int]], now: datetime | None = None
) -> list[Row]:
    """HANDING_OFF -> HANDED_OFF for each (capture id, token) whose token is still the capture's,
    in one statement; the captures that changed."""
    result = await conn.execute(
        text(
            f"""
            UPDATE captures c
            SET status = 'HANDED_OFF', handed_off_at = {NOW}, handoff_expires_at = NULL,
                last_error = NULL, updated_at = now()
            FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS bigint[])) AS f(id, token)
            WHERE c.id = f.id AND c.status = 'HANDING_OFF' AND c.handoff_token = f.token
            RETURNING c.*, clock_timestamp() AS db_at
            """
        ),
        {"ids": [c for c, _ in claims], "tokens": [t for _, t in claims], "now": now},
    )
    return list(result.mappings())


async def extend_handoff(
    conn: AsyncConnection,
    capture_id: str,
    token: int,
    *,
    lease_seconds: float,
    now: datetime | None = None,
) -> datetime | None:
    """The claim's lease pushed to ``lease_seconds`` from now while its targets answer, for the
    holder of ``token`` only; the new expiry, or None: the claim was reaped or finished."""
    result = await conn.execute(
        text(
            f"""
            UPDATE captures
            SET handoff_expires_at = {NOW} + make_interval(secs => :lease)
            WHERE id = :id AND status = 'HANDING_OFF' AND handoff_token = :token
            RETURNING handoff_expires_at
            """
        ),
        {"id": capture_id, "token": token, "lease": lease_seconds, "now": now},
    )
    return result.scalar_one_or_none()


async def finish_handoff(
    conn: AsyncConnection, capture_id: str, token: int, now: datetime | None = None
) -> Row | None:
    """HANDING_OFF -> HANDED_OFF, for the holder of the claim's token only.

    A lapsed claim still finishes while nobody took it over: the token proves nobody did.
    """
    result = await conn.execute(
        text(
            f"""
            UPDATE captures
            SET status = 'HANDED_OFF', handed_off_at = {NOW}, handoff_expires_at = NULL,
                last_error = NULL, updated_at = now()
            WHERE id = :id AND status = 'HANDING_OFF' AND handoff_token = :token
            RETURNING *, clock_timestamp() AS db_at
            """
        ),
        {"id": capture_id, "token": token, "now": now},
    )
    return result.mappings().first()


# HANDING_OFF -> RECEIVED, or FAILED at the cap or for a failure no retry can mend. ``retry_in``
# is the capped exponential backoff: base * 2^attempts, at most :backoff_max seconds.
_GIVE_BACK = f"""
    UPDATE captures
    SET status = CASE WHEN NOT :retryable OR attempts + 1 >= :max_attempts THEN 'FAILED'
                      ELSE 'RECEIVED' END::capture_status,
        attempts = attempts + 1,
        last_error = :reason,
        next_attempt_at = {NOW} + make_interval(
            secs => least(:backoff_max, :backoff_base * power(2, attempts))),
        dispatched_at = {{dispatched_at}},
        failed_at = CASE WHEN NOT :retryable OR attempts + 1 >= :max_attempts THEN {NOW} END,
        handoff_expires_at = NULL, updated_at = now()
    WHERE id = :id AND status = 'HANDING_OFF' AND handoff_token = :token {{stale}}
    RETURNING *
"""


async def give_back_handoff(
    conn: AsyncConnection,
    capture_id: str,
    token: int,
    *,
    reason: str,
    retryable: bool,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    now: datetime | None = None,
) -> Row | None:
    """HANDING_OFF -> RECEIVED after the backoff (attempts + 1), or -> FAILED with ``reason`` at
    the attempt cap or when not ``retryable``; for the holder of the claim's token only.

    Nothing is dispatched: the reaper publishes the retry's record once its backoff is over.
    """
    result = await conn.execute(
        text(_GIVE_BACK.format(dispatched_at="NULL", stale="")),
        {
            "id": capture_id,
            "token": token,
            "reason": reason,
            "retryable": retryable,
            "max_attempts": max_attempts,
            "backoff_base": backoff_base,
            "backoff_max": backoff_max,
            "now": now,
        },
    )
    return result.mappings().first()


async def find_lapsed_handoffs(
    conn: AsyncConnection, *, now: datetime | None, after: str, limit: int
) -> list[Row]:
    """A page (by id) of HANDING_OFF captures whose claim expired (their holder died)."""
    result = await conn.execute(
        text(
            f"""
            SELECT id, handoff_token FROM captures
            WHERE status = 'HANDING_OFF' AND handoff_expires_at < {NOW} AND id > :after
            ORDER BY id LIMIT :limit
            """
        ),
        {"now": now, "after": after, "limit": limit},
    )
    return list(result.mappings())


async def reclaim_lapsed_handoff(
    conn: AsyncConnection,
    capture_id: str,
    token: int,
    *,
    max_attempts: int,
    now: datetime | None = None,
) -> Row | None:
    """HANDING_OFF -> RECEIVED, dispatched now (attempts + 1), or -> FAILED at the cap; only
    while the claim of ``token`` is still lapsed (the staleness test, repeated)."""
    result = await conn.execute(
        text(
            _GIVE_BACK.format(
                dispatched_at=f"CASE WHEN attempts + 1 < :max_attempts THEN {NOW} END",
                stale=f"AND handoff_expires_at < {NOW}",
            )
        ),
        {
            "id": capture_id,
            "token": token,
            "reason": "handoff_lease_expired",
            "retryable": True,
            "max_attempts": max_attempts,
            "backoff_base": 0.0,  # the holder died: the next attempt may start at once
            "backoff_max": 0.0,
            "now": now,
        },
    )
    return result.mappings().first()


# A RECEIVED capture whose attempt is due and has no record in flight: none was written since
# its last attempt, or the one written is older than the redispatch delay and still unclaimed
# (the seed's "event never published" orphan), and none waits unsent in the outbox.
_UNDISPATCHED = f"""
    status = 'RECEIVED' AND next_attempt_at <= {NOW}
    AND (dispatched_at IS NULL
         OR dispatched_at < {NOW} - make_interval(secs => :redispatch_seconds))
"""


async def find_undispatched(
    conn: AsyncConnection,
    *,
    now: datetime | None,
    after: str,
    limit: int,
    redispatch_seconds: float,
    topic: str,
) -> list[Row]:
    """A page (by id) of RECEIVED captures that are due and have no record in flight."""
    result = await conn.execute(
        text(
            f"""
            SELECT c.id FROM captures c
            WHERE {_UNDISPATCHED} AND c.id > :after
              AND NOT EXISTS (SELECT 1 FROM outbox o
                              WHERE o.topic = :topic AND o.key = convert_to(c.id, 'UTF8'))
            ORDER BY c.id LIMIT :limit
            """
        ),
        {
            "now": now,
            "after": after,
            "limit": limit,
            "redispatch_seconds": redispatch_seconds,
            "topic": topic,
        },
    )
    return list(result.mappings())


async def mark_dispatched(
    conn: AsyncConnection,
    capture_id: str,
    *,
    redispatch_seconds: float,
    now: datetime | None = None,
) -> Row | None:
    """RECEIVED -> RECEIVED with a record in flight, while it is still undispatched (repeated
    staleness test); the caller writes the record in the same transaction."""
    result = await conn.execute(
        text(
            f"""
            UPDATE captures SET dispatched_at = {NOW}, updated_at = now()
            WHERE id = :id AND {_UNDISPATCHED}
            RETURNING *
            """
        ),
        {"id": capture_id, "redispatch_seconds": redispatch_seconds, "now": now},
    )
    return result.mappings().first()


async def retry_failed(conn: AsyncConnection, capture_id: str) -> Row | None:
    """FAILED -> RECEIVED with its attempts reset, dispatched now (an operator's retry)."""
    result = await conn.execute(
        text(
            """
            UPDATE captures
            SET status = 'RECEIVED', attempts = 0, next_attempt_at = now(), dispatched_at = now(),
                failed_at = NULL, handoff_holder = NULL, updated_at = now()
            WHERE id = :id AND status = 'FAILED'
            RETURNING *
            """
        ),
        {"id": capture_id},
    )
    return result.mappings().first()


async def list_captures(
    conn: AsyncConnection, *, status: str | None, site: str | None, limit: int
) -> list[Row]:
    """The newest captures, optionally of one status and one site."""
    result = await conn.execute(
        text(
            """
            SELECT id, job_id, site, status, attempts, next_attempt_at, last_error, created_at,
                   handed_off_at
            FROM captures
            WHERE (CAST(:status AS capture_status) IS NULL OR status = CAST(:status AS capture_status))
              AND (CAST(:site AS text) IS NULL OR site = :site)
            ORDER BY created_at DESC, id LIMIT :limit
            """
        ),
        {"status": status, "site": site, "limit": limit},
    )
    return list(result.mappings())


async def counts_by_site(conn: AsyncConnection) -> dict[str, dict[str, int]]:
    """How many captures each site has in each status."""
    result = await conn.execute(
        text("SELECT site, status::text, count(*) FROM captures GROUP BY site, status")
    )
    counts: dict[str, dict[str, int]] = {}
    for site, status, n in result:
        counts.setdefault(site, {})[status] = int(n)
    return counts


async def set_site_webhook(
    conn: AsyncConnection, slug: str, shown: str | None, sealed: bytes | None
) -> bool:
    """Set (or clear, with None) the webhook a site's captures are delivered to: its URL sealed
    (``SecretBox.seal``), and the scheme and host operators are shown."""
    result = await conn.execute(
        text(
            "UPDATE sites SET webhook_shown = :shown, webhook_sealed = :sealed"
            " WHERE slug = :slug RETURNING slug"
        ),
        {"slug": slug, "shown": shown, "sealed": sealed},
    )
    return result.first() is not None
