"""Sites: their settings and the capacity gate (rule 3)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.accounts import HEALTH, HEALTH_STATES
from app.store.rows import Row


async def add_site(
    conn: AsyncConnection,
    *,
    slug: str,
    host: str,
    capacity: int,
    lease_seconds: int = 300,
    cooldown_seconds: int = 0,
    block_cooldown_seconds: int = 3600,
    max_attempts: int = 3,
    dag_id: str | None = None,
    session_check_url: str | None = None,
    account_budget: int | None = None,
    account_budget_seconds: int = 3600,
    grants_per_minute: int | None = None,
    proxy_required: bool = False,
    retire_after_blocks: int | None = None,
) -> Row | None:
    """Create a site; None if the slug is taken."""
    result = await conn.execute(
        text(
            """
            INSERT INTO sites (slug, host, capacity, lease_seconds, cooldown_seconds,
                               block_cooldown_seconds, max_attempts, dag_id, session_check_url,
                               account_budget, account_budget_seconds, grants_per_minute,
                               proxy_required, retire_after_blocks)
            VALUES (:slug, :host, :capacity, :lease_seconds, :cooldown_seconds,
                    :block_cooldown_seconds, :max_attempts, :dag_id, :session_check_url,
                    :account_budget, :account_budget_seconds, :grants_per_minute,
                    :proxy_required, :retire_after_blocks)
            ON CONFLICT (slug) DO NOTHING
            RETURNING *
            """
        ),
        {
            "slug": slug,
            "host": host,
            "capacity": capacity,
            "lease_seconds": lease_seconds,
            "cooldown_seconds": cooldown_seconds,
            "block_cooldown_seconds": block_cooldown_seconds,
            "max_attempts": max_attempts,
            "dag_id": dag_id,
            "session_check_url": session_check_url,
            "account_budget": account_budget,
            "account_budget_seconds": account_budget_seconds,
            "grants_per_minute": grants_per_minute,
            "proxy_required": proxy_required,
            "retire_after_blocks": retire_after_blocks,
        },
    )
    return result.mappings().first()


# The settings an operator may change with `qm sites set`, by column name.
EDITABLE = (
    "host",
    "capacity",
    "lease_seconds",
    "cooldown_seconds",
    "block_cooldown_seconds",
    "max_attempts",
    "dag_id",
    "session_check_url",
    # use budgets (docs/policy.md): None turns one off
    "account_budget",
    "account_budget_seconds",
    "grants_per_minute",
    "proxy_required",
    "retire_after_blocks",
)


# a paused site keeps capacity 0: a capacity set meanwhile is what its resume brings back
_PAUSED_CAPACITY = (
    "capacity = CASE WHEN paused_capacity IS NULL THEN :capacity ELSE 0 END, "
    "paused_capacity = CASE WHEN paused_capacity IS NULL THEN NULL ELSE :capacity END"
)


async def update_site(conn: AsyncConnection, slug: str, changes: dict[str, object]) -> Row | None:
    """Change some of a site's settings (``EDITABLE`` columns); None if there is no such site.

    A capacity raised while jobs wait lets the capacity-back sweep grant them; a capacity
    lowered below ``running`` lets running jobs finish and grants nothing until it is below.
    A paused site stays paused: its new capacity is the one its resume brings back.
    """
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    assignments = ", ".join(
        _PAUSED_CAPACITY if column == "capacity" else f"{column} = :{column}" for column in changes
    )
    result = await conn.execute(
        text(f"UPDATE sites SET {assignments} WHERE slug = :slug RETURNING *"),
        {**changes, "slug": slug},
    )
    return result.mappings().first()


async def remove_site(conn: AsyncConnection, slug: str) -> Row | None:
    """Delete a site with its accounts, seeds and finished jobs, while nothing of it is live.

    None when there is no such site, or a job of it waits or runs, or one of its captures is
    still to be handed off. The caller holds the site's lock, so no job queues meanwhile.
    """
    result = await conn.execute(
        text(
            """
            WITH gone AS (
                DELETE FROM sites s
                WHERE s.slug = :slug
                  AND NOT EXISTS (SELECT 1 FROM jobs WHERE site = s.slug
                                                       AND status IN ('QUEUED', 'RUNNING'))
                  AND NOT EXISTS (SELECT 1 FROM captures WHERE site = s.slug
                                                           AND status IN ('RECEIVED', 'HANDING_OFF'))
                RETURNING s.slug
            ),
            -- foreign keys are checked when the statement ends, after every delete below
            captures_gone AS (DELETE FROM captures WHERE site IN (SELECT slug FROM gone)),
            grants_gone AS (DELETE FROM job_grants WHERE site IN (SELECT slug FROM gone)),
            jobs_gone AS (DELETE FROM jobs WHERE site IN (SELECT slug FROM gone)),
            seeds_gone AS (DELETE FROM seeds WHERE site IN (SELECT slug FROM gone)),
            accounts_gone AS (DELETE FROM accounts WHERE site IN (SELECT slug FROM gone))
            SELECT slug FROM gone
            """
        ),
        {"slug": slug},
    )
    return result.mappings().first()


async def has_site(conn: AsyncConnection, slug: str) -> bool:
    """Whether the site exists (a read: no lock, for commands that only show)."""
    result = await conn.execute(text("SELECT 1 FROM sites WHERE slug = :slug"), {"slug": slug})
    return result.first() is not None


async def live_work(conn: AsyncConnection, slug: str) -> Row:
    """What keeps a site from being removed: its waiting or running jobs, pending captures."""
    result = await conn.execute(
        text(
            """
            SELECT (SELECT count(*) FROM jobs WHERE site = :slug
                                                AND status IN ('QUEUED', 'RUNNING')) AS live_jobs,
                   (SELECT count(*) FROM captures WHERE site = :slug
                                                    AND status IN ('RECEIVED', 'HANDING_OFF'))
                       AS pending_captures
            """
        ),
        {"slug": slug},
    )
    return result.mappings().one()


_LOCK_SITE = """
    SELECT s.*,
           -- min(available_at), not EXISTS: only the accounts_grantable index yields it without
           -- reading every account, so no statistics make this a scan of the site's accounts
           (SELECT min(a.available_at) FROM accounts a
            WHERE a.site = s.slug AND a.status <> 'INACTIVE') IS NOT NULL AS has_accounts,
           EXISTS (SELECT 1 FROM jobs j WHERE j.site = s.slug AND j.status = 'QUEUED')
               AS has_waiting
    FROM sites s WHERE {which} FOR UPDATE OF s
"""


async def lock_site(conn: AsyncConnection, slug: str) -> Row | None:
    """Lock a site's row for this transaction; None if there is no such site.

    Every transaction that queues, grants or releases on a site takes this lock first, so grants
    happen in FIFO order (rule 4) and the capacity gate cannot be raced (rule 3). Lock order
    everywhere: site, then job, then account. The row also says whether the site has any account
    that could ever be granted (``has_accounts``: not INACTIVE) and whether jobs wait on it
    (``has_waiting``), as they stand under the lock.
    """
    result = await conn.execute(text(_LOCK_SITE.format(which="s.slug = :slug")), {"slug": slug})
    return result.mappings().first()


async def lock_site_of_job(conn: AsyncConnection, job_id: str) -> Row | None:
    """``lock_site`` for the site of a job (a job's site never changes); None for no such job."""
    result = await conn.execute(
        text(_LOCK_SITE.format(which="s.slug = (SELECT site FROM jobs WHERE id = :job_id)")),
        {"job_id": job_id},
    )
    return result.mappings().first()


async def sites_with_waiting_jobs(conn: AsyncConnection, now: datetime | None = None) -> list[str]:
    """Sites that have waiting jobs and free capacity: candidates for granting by time."""
    result = await conn.execute(
        text(
            """
            SELECT s.slug FROM sites s
            WHERE s.running < s.capacity
              AND EXISTS (SELECT 1 FROM jobs j WHERE j.site = s.slug AND j.status = 'QUEUED')
              AND (NOT EXISTS (SELECT 1 FROM jobs j WHERE j.site = s.slug AND j.status = 'QUEUED'
                                                        AND j.needs_account)
                   OR EXISTS (SELECT 1 FROM accounts a WHERE a.site = s.slug AND a.status = 'ACTIVE'
                              AND a.available_at <= coalesce(CAST(:now AS timestamptz), now())))
            ORDER BY s.slug
            """
        ),
        {"now": now},
    )
    return [row[0] for row in result]


async def site_load(conn: AsyncConnection) -> list[dict[str, object]]:
    """Every site's running and waiting jobs, its accounts by status and by health (every one,
    0 too)."""
    result = await conn.execute(
        text(
            """
            SELECT s.slug, s.running,
                   (SELECT count(*) FROM jobs j WHERE j.site = s.slug AND j.status = 'QUEUED')
                       AS waiting,
                   (SELECT jsonb_object_agg(st.status, (SELECT count(*) FROM accounts a
                                                        WHERE a.site = s.slug
                                                          AND a.status = st.status))
                    FROM unnest(enum_range(NULL::account_status)) AS st(status)) AS accounts,
                   (SELECT jsonb_object_agg(h.state, (SELECT count(*) FROM accounts a
                                                      WHERE a.site = s.slug AND @HEALTH = h.state))
                    FROM unnest(CAST(:health AS text[])) AS h(state)) AS health
            FROM sites s ORDER BY s.slug
            """.replace("@HEALTH", HEALTH)
        ),
        {"health": list(HEALTH_STATES)},
    )
    return [dict(row) for row in result.mappings()]


async def pause_site(conn: AsyncConnection, slug: str) -> Row | None:
    """An operator's pause: capacity -> 0, the capacity it had kept in ``paused_capacity``.

    Running jobs finish; nothing is granted until it is resumed. None when there is no such site
    or it is paused already."""
    result = await conn.execute(
        text(
            """
            UPDATE sites SET paused_capacity = capacity, capacity = 0
            WHERE slug = :slug AND paused_capacity IS NULL
            RETURNING slug, capacity, paused_capacity, clock_timestamp() AS db_at
            """
        ),
        {"slug": slug},
    )
    return result.mappings().first()


async def resume_site(conn: AsyncConnection, slug: str) -> Row | None:
    """An operator's resume: the capacity the pause kept comes back (waiting jobs are granted
    within one capacity-back sweep). None when there is no such site or it is not paused."""
    result = await conn.execute(
        text(
            """
            UPDATE sites SET capacity = paused_capacity, paused_capacity = NULL
            WHERE slug = :slug AND paused_capacity IS NOT NULL
            RETURNING slug, capacity, paused_capacity, clock_timestamp() AS db_at
            """
        ),
        {"slug": slug},
    )
    return result.mappings().first()
