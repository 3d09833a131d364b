"""Accounts: ACTIVE -> USING (grant, in jobs.grant_next_waiting) -> ACTIVE | BLOCKED; operator moves."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.jobs import NOW
from app.store.rows import Row
from schemas.states import ACCOUNT_TRANSITIONS, AccountStatus, predecessors

# An account's health (docs/policy.md#account-health), from its status, its blocks and errors in
# a row (a success forgets them), its uses and its age; ``a`` is the account, of any site. One
# expression, so `qm accounts list`, `qm top` and the metrics never disagree.
HEALTH_STATES = ("new", "healthy", "at_risk", "failing", "blocked", "retired")
HEALTH = """CASE
    WHEN a.status = 'INACTIVE' THEN 'retired'
    WHEN a.status = 'BLOCKED' THEN 'blocked'
    -- one more block retires it, or it keeps failing
    WHEN a.consecutive_blocks >= 2 OR a.consecutive_errors >= 5
      OR a.consecutive_blocks + 1 >= (SELECT retire_after_blocks FROM sites
                                      WHERE slug = a.site) THEN 'failing'
    WHEN a.consecutive_blocks >= 1 OR a.consecutive_errors >= 2 THEN 'at_risk'
    -- fresh accounts are watched more closely by sites: not proven yet
    WHEN a.use_count < 10 AND a.created_at > now() - interval '1 day' THEN 'new'
    ELSE 'healthy' END"""


async def add_account(
    conn: AsyncConnection, *, site: str, username: str, sealed_secret: bytes
) -> Row | None:
    """Create an ACTIVE account; None if the site already has that username."""
    result = await conn.execute(
        text(
            """
            INSERT INTO accounts (site, username, secret) VALUES (:site, :username, :secret)
            ON CONFLICT (site, username) DO NOTHING
            RETURNING id, site, username, status
            """
        ),
        {"site": site, "username": username, "secret": sealed_secret},
    )
    return result.mappings().first()


async def list_accounts(conn: AsyncConnection, site: str | None = None) -> list[Row]:
    """Accounts without their secrets, with the collector of the job that holds each, their
    health, age and proxy (its label)."""
    result = await conn.execute(
        text(
            f"""
            SELECT a.id, a.site, a.username, a.status, a.available_at, a.blocked_until,
                   a.holder_job_id, j.collector AS holder_collector, a.lease_token,
                   a.lease_expires_at, a.use_count, a.error_count, a.blocked_reason,
                   (a.status = 'ACTIVE' AND a.available_at > now()) AS resting,
                   a.consecutive_blocks, a.consecutive_errors, a.created_at,
                   extract(epoch FROM now() - a.created_at)::float8 AS age_seconds,
                   {HEALTH} AS health, p.label AS proxy
            FROM accounts a LEFT JOIN jobs j ON j.id = a.holder_job_id
                 LEFT JOIN proxies p ON p.id = a.proxy_id
            WHERE (CAST(:site AS text) IS NULL OR a.site = :site) ORDER BY a.site, a.id
            """
        ),
        {"site": site},
    )
    return list(result.mappings())


async def set_account_status(
    conn: AsyncConnection,
    *,
    site: str,
    username: str,
    target: AccountStatus,
    reason: str | None = None,
) -> Row | None:
    """An operator's move (block, unblock, deactivate), from the target's legal predecessors only."""
    result = await conn.execute(
        text(
            """
            UPDATE accounts
            SET status = CAST(:target AS account_status),
                blocked_reason = CASE WHEN :target = 'BLOCKED' THEN :reason ELSE NULL END,
                -- an operator's block stays until an operator ends it
                blocked_until = NULL,
                -- an operator's unblock puts the account back in service now; one brought back
                -- from retirement starts a clean slate (its next block does not retire it)
                available_at = CASE WHEN :target = 'ACTIVE' THEN now() ELSE available_at END,
                consecutive_blocks = CASE WHEN :target = 'ACTIVE' AND status = 'INACTIVE'
                                          THEN 0 ELSE consecutive_blocks END,
                updated_at = now()
            WHERE site = :site AND username = :username
              AND status = ANY(CAST(:legal AS account_status[]))
            RETURNING id, site, username, status
            """
        ),
        {
            "site": site,
            "username": username,
            "target": target.value,
            "reason": reason,
            "legal": [
                s.value
                for s in predecessors(ACCOUNT_TRANSITIONS, target)
                if s != AccountStatus.USING
            ],
        },
    )
    return result.mappings().first()


async def account_statuses(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, str]:
    """The status of each named account that exists."""
    result = await conn.execute(
        text("SELECT id, status FROM accounts WHERE id = ANY(:ids)"), {"ids": list(ids)}
    )
    return {int(row.id): str(row.status) for row in result}


async def remove_account(conn: AsyncConnection, *, site: str, username: str) -> Row | None:
    """Delete an account that no job holds (any status but USING), with its session.

    Finished jobs that used it keep their history in ``job_grants``; their ``account_id`` is
    cleared. None when there is no such account or a job holds it.
    """
    result = await conn.execute(
        text(
            """
            WITH gone AS (
                DELETE FROM accounts
                WHERE site = :site AND username = :username AND status <> 'USING'
                RETURNING id, site, username, status
            ),
            unlinked AS (
                -- the foreign key is checked when the statement ends, after this update
                UPDATE jobs SET account_id = NULL WHERE account_id IN (SELECT id FROM gone)
            )
            SELECT * FROM gone
            """
        ),
        {"site": site, "username": username},
    )
    return result.mappings().first()


async def find_ended_blocks(
    conn: AsyncConnection, *, now: datetime | None, after: int, limit: int
) -> list[Row]:
    """A page (by id) of BLOCKED accounts whose block cooldown has passed."""
    result = await conn.execute(
        text(
            f"""
            SELECT id, site, lease_token FROM accounts
            WHERE status = 'BLOCKED' AND blocked_until <= {NOW} AND id > :after
            ORDER BY id LIMIT :limit
            """
        ),
        {"now": now, "after": after, "limit": limit},
    )
    return list(result.mappings())


async def end_block(
    conn: AsyncConnection, account_id: int, lease_token: int, now: datetime | None = None
) -> Row | None:
    """BLOCKED -> ACTIVE once its block cooldown has passed.

    Fenced by the lease token read with the page, and the staleness test is repeated: an
    operator's unblock or block, or a new grant and block since the page was read, makes this
    a no-op.
    """
    result = await conn.execute(
        text(
            f"""
            UPDATE accounts
            SET status = 'ACTIVE', blocked_until = NULL, blocked_reason = NULL,
                available_at = greatest(available_at, blocked_until), updated_at = now()
            WHERE id = :id AND status = 'BLOCKED' AND lease_token = :token
              AND blocked_until <= {NOW}
            RETURNING id, site, status, available_at
            """
        ),
        {"id": account_id, "token": lease_token, "now": now},
    )
    return result.mappings().first()


async def retire_unreadable(
    conn: AsyncConnection, *, account_id: int, job_id: str, lease_token: int, reason: str
) -> Row | None:
    """USING -> INACTIVE for an account whose grant found its secret (or session) sealed with no
    key of ``QM_SECRET_KEYS``: out of service with ``reason`` until an operator acts. Only for
    the grant that holds it (job and token); None otherwise."""
    result = await conn.execute(
        text(
            """
            UPDATE accounts
            SET status = 'INACTIVE', holder_job_id = NULL, lease_expires_at = NULL,
                blocked_reason = :reason, updated_at = now()
            WHERE id = :id AND status = 'USING' AND holder_job_id = :job_id
              AND lease_token = :token
            RETURNING id, site, username, status
            """
        ),
        {"id": account_id, "job_id": job_id, "token": lease_token, "reason": reason},
    )
    return result.mappings().first()
