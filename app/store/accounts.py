"""Accounts: ACTIVE -> USING (grant, in jobs.grant_next_waiting) -> ACTIVE | BLOCKED; operator moves."""

from __future__ import annotations

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


async def release_account(
    conn: AsyncConnection,
    *,
    account_id: int,
    job_id: str,
    lease_token: int,
    blocked: bool,
    failed: bool,
    rest_seconds: int,
    reason: str | None,
) -> RowMapping | None:
    """USING -> ACTIVE (or BLOCKED), resting ``rest_seconds``; only for the holder's token."""
    result = await conn.execute(
        text(
            """
            UPDATE accounts
            SET status = CASE WHEN :blocked THEN 'BLOCKED' ELSE 'ACTIVE' END::account_status,
                holder_job_id = NULL,
                lease_expires_at = NULL,
                available_at = now() + make_interval(secs => :rest),
                error_count = error_count + CASE WHEN :failed OR :blocked THEN 1 ELSE 0 END,
                blocked_reason = CASE WHEN :blocked THEN :reason ELSE blocked_reason END,
                updated_at = now()
            WHERE id = :account_id AND status = 'USING'
              AND holder_job_id = :job_id AND lease_token = :lease_token
            RETURNING id, site, status, available_at
            """
        ),
        {
            "account_id": account_id,
            "job_id": job_id,
            "lease_token": lease_token,
            "blocked": blocked,
            "failed": failed,
            "rest": rest_seconds,
            "reason": reason,
        },
    )
    return result.mappings().first()


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


async def load_secret(conn: AsyncConnection, account_id: int) -> bytes | None:
    """The sealed secret of an account (decrypted only by the caller, only for a grant)."""
    result = await conn.execute(
        text("SELECT secret FROM accounts WHERE id = :id"), {"id": account_id}
    )
    row = result.first()
    return None if row is None else bytes(row[0])


async def load_session(conn: AsyncConnection, account_id: int) -> RowMapping | None:
    """The stored browser session of an account (sealed)."""
    result = await conn.execute(
        text("SELECT version, storage_state FROM sessions WHERE account_id = :id"),
        {"id": account_id},
    )
    return result.mappings().first()
