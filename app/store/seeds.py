"""Seeds: ACTIVE -> ASSIGNED (claim) -> ACTIVE (result, release) | DISABLED (failures, operator).

A seed is handed to one live lease at a time: the claim takes due ACTIVE seeds with
``FOR UPDATE SKIP LOCKED`` and marks them with the job and its lease token; every later change
(results, release) names that token, so a zombie holding an older one touches nothing. Lock order:
the job's row before its seeds (the claim takes the job ``FOR SHARE``; finish, cancel and the
reaper have updated it before they settle its seeds), so a claim and a finish of the same job
never leave a seed with a finished holder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row
from schemas.states import SEED_TRANSITIONS, SeedStatus, predecessors

NOW = "coalesce(CAST(:now AS timestamptz), now())"


@dataclass(frozen=True)
class Claimed:
    """What a claim found: whether the lease was live, and the seeds it now holds (maybe none)."""

    live: bool
    seeds: list[Row]


_CLAIM = text(
    f"""
    WITH job AS (
        -- fencing: only the live lease of the job may claim. FOR SHARE holds off a finish,
        -- cancel or expiry of the job until this claim commits, so they settle what it took.
        SELECT id, site, lease_token, lease_expires_at FROM jobs
        WHERE id = :job_id AND status = 'RUNNING' AND lease_token = :token
          AND lease_secret_hash = :secret_hash AND lease_expires_at > {NOW}
        FOR SHARE
    ),
    picked AS (
        -- due seeds of the job's site, by priority then due time (the seeds_due index order);
        -- SKIP LOCKED: concurrent claimers each take other seeds instead of queueing
        SELECT s.id FROM seeds s
        WHERE s.site = (SELECT site FROM job) AND s.status = 'ACTIVE' AND s.next_due_at <= {NOW}
        ORDER BY s.priority DESC, s.next_due_at, s.id
        LIMIT :limit
        FOR UPDATE OF s SKIP LOCKED
    ),
    assigned AS (
        UPDATE seeds s
        SET status = 'ASSIGNED', holder_job_id = job.id, lease_token = job.lease_token,
            lease_expires_at = job.lease_expires_at, updated_at = now()
        FROM picked, job
        WHERE s.id = picked.id AND s.status = 'ACTIVE'
        RETURNING s.id, s.site, s.url, s.status, s.priority, s.next_due_at, s.lease_token,
                  clock_timestamp() AS db_at
    ),
    history AS (
        -- who held which seed when: read by operators and by the exclusivity tests
        INSERT INTO seed_assignments (seed_id, lease_token, job_id)
        SELECT id, :token, :job_id FROM assigned
        -- the same lease holds a seed again only after an operator disabled and enabled it
        -- while it was held: its row then tells the latest hold
        ON CONFLICT (seed_id, lease_token) DO UPDATE
        SET assigned_at = clock_timestamp(), ended_at = NULL, end_reason = NULL
    )
    -- one row with live = false when the lease is not live; one row per seed otherwise (a row
    -- with no seed when none is due)
    SELECT (job.id IS NOT NULL) AS live, assigned.*
    FROM (SELECT 1) one LEFT JOIN job ON true LEFT JOIN assigned ON true
    ORDER BY assigned.priority DESC, assigned.next_due_at, assigned.id
    """
)


async def claim_seeds(
    conn: AsyncConnection,
    *,
    job_id: str,
    lease_token: int,
    secret_hash: bytes | None,
    limit: int,
    now: datetime | None = None,
) -> Claimed:
    """Up to ``limit`` due seeds of the job's site ACTIVE -> ASSIGNED to the job's live lease
    (its token and the hash of its secret)."""
    result = await conn.execute(
        _CLAIM,
        {
            "job_id": job_id,
            "token": lease_token,
            "secret_hash": secret_hash,
            "limit": limit,
            "now": now,
        },
    )
    rows = list(result.mappings())
    live = bool(rows) and bool(rows[0]["live"])
    return Claimed(live, [row for row in rows if row["id"] is not None])


@dataclass(frozen=True)
class Outcome:
    """How one seed went, as its holder reported it."""

    seed_id: int
    ok: bool
    next_due_seconds: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Policy:
    """When a seed is due again after a failure, and after how many failures in a row it stops."""

    failures_to_disable: int
    backoff_seconds: int
    backoff_max_seconds: int


_SETTLE = text(
    f"""
    WITH results AS (
        SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:oks AS boolean[]),
                             CAST(:dues AS integer[]), CAST(:reasons AS text[]))
                 AS r(id, ok, due, reason)
    ),
    held AS (
        -- only the seeds this lease holds; a result for any other seed is ignored
        SELECT s.id, r.ok, r.due, r.reason,
               (r.ok = false AND s.failure_count + 1 >= :max_failures) AS disabling
        FROM seeds s LEFT JOIN results r ON r.id = s.id
        WHERE s.holder_job_id = :job_id AND s.lease_token = :token AND s.status = 'ASSIGNED'
    ),
    settled AS (
        UPDATE seeds s
        SET status = CASE WHEN held.disabling THEN 'DISABLED' ELSE 'ACTIVE' END::seed_status,
            -- a reported seed is due after its own wish, its interval, or its backoff; an
            -- unreported one is due again at once
            next_due_at = CASE
                WHEN held.due IS NOT NULL THEN {NOW} + make_interval(secs => held.due)
                WHEN held.ok THEN {NOW} + make_interval(secs => s.interval_seconds)
                WHEN NOT held.ok THEN {NOW} + make_interval(secs => least(
                    :backoff * power(2, least(s.failure_count, 30)), :backoff_max))
                ELSE s.next_due_at END,
            failure_count = CASE WHEN held.ok THEN 0 WHEN NOT held.ok THEN s.failure_count + 1
                                 ELSE s.failure_count END,
            last_error = CASE WHEN NOT held.ok THEN coalesce(held.reason, 'failed')
                              ELSE s.last_error END,
            last_done_at = CASE WHEN held.ok IS NULL THEN s.last_done_at ELSE {NOW} END,
            disabled_reason = CASE WHEN held.disabling THEN format(
                'failed %s times in a row (last: %s)', s.failure_count + 1,
                coalesce(held.reason, 'no reason given')) END,
            holder_job_id = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
        FROM held
        WHERE s.id = held.id AND s.holder_job_id = :job_id AND s.lease_token = :token
          AND s.status = 'ASSIGNED'
        RETURNING s.id, s.site, s.status, s.next_due_at, s.failure_count, s.disabled_reason,
                  held.ok, CAST(:token AS bigint) AS lease_token, clock_timestamp() AS db_at
    ),
    history AS (
        UPDATE seed_assignments a
        SET ended_at = clock_timestamp(),
            end_reason = CASE WHEN settled.ok THEN 'done' WHEN NOT settled.ok THEN 'failed'
                              ELSE :release_reason END
        FROM settled
        WHERE a.seed_id = settled.id AND a.lease_token = :token AND a.ended_at IS NULL
    )
    SELECT * FROM settled ORDER BY id
    """
)


async def settle_seeds(
    conn: AsyncConnection,
    *,
    job_id: str,
    lease_token: int,
    outcomes: Sequence[Outcome],
    policy: Policy,
    release_reason: str,
    now: datetime | None = None,
) -> list[Row]:
    """Every seed the lease holds ASSIGNED -> ACTIVE | DISABLED, in one statement.

    A reported success is due after ``next_due_seconds`` or its interval and resets its failure
    count; a failure backs off (``backoff * 2^failures``, capped) and at the policy's count turns
    DISABLED with the reason kept; a seed without a result goes back ACTIVE, due at once (its
    hold ends with ``release_reason``). Seeds the token does not hold are untouched. Each row
    says ``ok`` (None: released without a result).
    """
    result = await conn.execute(
        _SETTLE,
        {
            "job_id": job_id,
            "token": lease_token,
            "ids": [o.seed_id for o in outcomes],
            "oks": [o.ok for o in outcomes],
            "dues": [o.next_due_seconds for o in outcomes],
            "reasons": [o.reason for o in outcomes],
            "max_failures": policy.failures_to_disable,
            "backoff": policy.backoff_seconds,
            "backoff_max": policy.backoff_max_seconds,
            "release_reason": release_reason,
            "now": now,
        },
    )
    return list(result.mappings())


# --- operators -----------------------------------------------------------------------------


async def add_seed(
    conn: AsyncConnection, *, site: str, url: str, interval_seconds: int, priority: int
) -> Row | None:
    """A new ACTIVE seed, due now; None if the site has that URL already."""
    result = await conn.execute(
        text(
            """
            INSERT INTO seeds (site, url, interval_seconds, priority)
            VALUES (:site, :url, :interval, :priority)
            ON CONFLICT (site, url) DO NOTHING
            RETURNING *
            """
        ),
        {"site": site, "url": url, "interval": interval_seconds, "priority": priority},
    )
    return result.mappings().first()


async def list_seeds(
    conn: AsyncConnection,
    site: str,
    *,
    status: SeedStatus | None = None,
    due: bool = False,
    limit: int = 100,
) -> list[Row]:
    """A site's seeds in claim order (``due``: only ACTIVE ones due now)."""
    result = await conn.execute(
        text(
            """
            SELECT * FROM seeds
            WHERE site = :site
              AND (CAST(:status AS seed_status) IS NULL OR status = CAST(:status AS seed_status))
              AND (NOT CAST(:due AS boolean) OR (status = 'ACTIVE' AND next_due_at <= now()))
            ORDER BY priority DESC, next_due_at, id LIMIT :limit
            """
        ),
        {"site": site, "status": status, "due": due, "limit": limit},
    )
    return list(result.mappings())


async def set_seed_status(
    conn: AsyncConnection, *, site: str, seed: str, target: SeedStatus, reason: str | None = None
) -> Row | None:
    """An operator's move: -> DISABLED (with a reason; a holder's later result is ignored) or
    DISABLED -> ACTIVE (due now, failures forgotten). ``seed`` is an id or a URL of the site.
    None when no such seed can make that move. The row says whose hold it ended
    (``previous_token``, ``previous_holder``) and when (``db_at``), for its event."""
    result = await conn.execute(
        text(
            """
            WITH before AS (
                SELECT id, lease_token AS previous_token, holder_job_id AS previous_holder
                FROM seeds
                WHERE site = :site AND (url = :seed OR CAST(id AS text) = :seed)
                  AND status = ANY(CAST(:from AS seed_status[]))
                FOR UPDATE
            ),
            moved AS (
                UPDATE seeds
                SET status = CAST(:target AS seed_status),
                    disabled_reason = CASE WHEN CAST(:target AS text) = 'DISABLED' THEN CAST(:reason AS text) END,
                    failure_count = CASE WHEN CAST(:target AS text) = 'ACTIVE' THEN 0 ELSE failure_count END,
                    next_due_at = CASE WHEN CAST(:target AS text) = 'ACTIVE' THEN now() ELSE next_due_at END,
                    holder_job_id = NULL, lease_token = NULL, lease_expires_at = NULL,
                    updated_at = now()
                FROM before
                WHERE seeds.id = before.id AND seeds.status = ANY(CAST(:from AS seed_status[]))
                RETURNING seeds.*, before.previous_token, before.previous_holder,
                          clock_timestamp() AS db_at
            ),
            history AS (
                UPDATE seed_assignments a SET ended_at = clock_timestamp(), end_reason = 'disabled'
                FROM moved WHERE a.seed_id = moved.id AND a.ended_at IS NULL
            )
            SELECT * FROM moved
            """
        ),
        {
            "site": site,
            "seed": seed,
            "target": str(target),
            "reason": reason or "operator",
            # enabling takes DISABLED seeds only: a held seed is its holder's until it settles
            "from": ["DISABLED"]
            if target == SeedStatus.ACTIVE
            else [str(s) for s in predecessors(SEED_TRANSITIONS, target)],
        },
    )
    return result.mappings().first()


# --- import ----------------------------------------------------------------------------------

IMPORT_COLUMNS = ("line", "url", "interval_seconds", "priority")


async def begin_import(conn: AsyncConnection) -> None:
    """A temporary table for this transaction's import rows (COPY fills it, one upsert empties it)."""
    await conn.execute(
        text(
            """
            CREATE TEMP TABLE seed_import (
                line integer NOT NULL, url text NOT NULL,
                interval_seconds integer NOT NULL, priority integer NOT NULL
            ) ON COMMIT DROP
            """
        )
    )


async def copy_import_rows(
    conn: AsyncConnection, records: Sequence[tuple[int, str, int, int]]
) -> None:
    """``(line, url, interval_seconds, priority)`` rows into the import table with COPY."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    await driver.copy_records_to_table("seed_import", records=records, columns=IMPORT_COLUMNS)


async def finish_import(conn: AsyncConnection, site: str) -> tuple[int, int]:
    """Upsert the import table into the site's seeds by URL in one statement; (added, updated).

    A new URL is an ACTIVE seed due now; a known one takes the row's interval and priority and
    keeps its status and due time (a row that changes nothing counts as neither).
    """
    result = await conn.execute(
        text(
            """
            WITH upserted AS (
                INSERT INTO seeds AS s (site, url, interval_seconds, priority)
                -- one row per URL, the first line's, so no row is upserted twice
                SELECT DISTINCT ON (url) :site, url, interval_seconds, priority
                FROM seed_import ORDER BY url, line
                ON CONFLICT (site, url) DO UPDATE
                SET interval_seconds = excluded.interval_seconds, priority = excluded.priority,
                    updated_at = now()
                WHERE (s.interval_seconds, s.priority)
                      IS DISTINCT FROM (excluded.interval_seconds, excluded.priority)
                RETURNING (xmax = 0) AS added
            )
            SELECT count(*) FILTER (WHERE added), count(*) FILTER (WHERE NOT added) FROM upserted
            """
        ),
        {"site": site},
    )
    added, updated = result.one()
    return int(added), int(updated)


async def site_exists(conn: AsyncConnection, site: str) -> bool:
    """Whether the site exists; it then stays until this transaction ends (a removal, which
    locks the site first, waits), so seeds added next never meet a site removed meanwhile."""
    result = await conn.execute(
        text("SELECT 1 FROM sites WHERE slug = :site FOR KEY SHARE"), {"site": site}
    )
    return result.first() is not None


async def generate_seeds(conn: AsyncConnection, site: str, count: int, priorities: int) -> None:
    """``count`` due seeds for a site in one statement (benchmarks and load tests), spread over
    ``priorities`` priority levels and a day of past due times."""
    await conn.execute(
        text(
            """
            INSERT INTO seeds (site, url, priority, next_due_at)
            SELECT :site, 'https://' || :site || '.example.com/board/' || n, n % :priorities,
                   now() - make_interval(secs => n % 86400)
            FROM generate_series(1, :count) AS n
            """
        ),
        {"site": site, "count": count, "priorities": priorities},
    )


async def vacuum_seeds(conn: AsyncConnection) -> None:
    """VACUUM (ANALYZE) the seeds table and its history (on an autocommit connection), so a
    benchmark run starts without the dead rows of the one before."""
    await conn.execute(text("VACUUM (ANALYZE) seeds, seed_assignments"))
