"""Accounts: ACTIVE -> USING (grant, in jobs.grant_next_waiting) -> ACTIVE | BLOCKED; operator moves."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.states import ACCOUNT_TRANSITIONS, AccountStatus, predecessors


async def add_account(
    conn: AsyncConnection, *, site: str, username: str, sealed_secret: bytes
) -> RowMapping | None:
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


async def list_accounts(conn: AsyncConnection, site: str | None = None) -> list[RowMapping]:
    """Accounts without their secrets."""
    result = await conn.execute(
        text(
            """
            SELECT id, site, username, status, available_at, holder_job_id, lease_token,
                   lease_expires_at, use_count, error_count, blocked_reason
            FROM accounts WHERE (CAST(:site AS text) IS NULL OR site = :site) ORDER BY site, id
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
) -> RowMapping | None:
    """An operator's move (block, unblock, deactivate), from the target's legal predecessors only."""
    result = await conn.execute(
        text(
            """
            UPDATE accounts
            SET status = CAST(:target AS account_status),
                blocked_reason = CASE WHEN :target = 'BLOCKED' THEN :reason ELSE NULL END,
                -- an operator's unblock puts the account back in service now
                available_at = CASE WHEN :target = 'ACTIVE' THEN now() ELSE available_at END,
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
