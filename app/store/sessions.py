"""Sessions: one Playwright storage state per account (sealed at rest), versioned."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row


async def held_session(
    conn: AsyncConnection, job_id: str, lease_token: int, secret_hash: bytes | None
) -> Row | None:
    """The account a live lease holds and its session (if any), locked for this transaction.

    ``now_epoch`` is the database's clock (Unix seconds), against which cookies expire. None
    when the token does not hold a live lease on an account, or the secret is not the lease's
    (fencing).
    """
    result = await conn.execute(
        text(
            """
            SELECT a.id AS account_id, a.site, s.version, s.storage_state,
                   extract(epoch FROM now()) AS now_epoch
            FROM accounts a LEFT JOIN sessions s ON s.account_id = a.id
            WHERE a.holder_job_id = :job AND a.lease_token = :token AND a.status = 'USING'
              AND a.lease_expires_at > clock_timestamp()
              -- the lease's secret: its job keeps the hash (also once a finish in this
              -- transaction ended it)
              AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = :job AND j.lease_token = :token
                          AND j.lease_secret_hash = :secret_hash)
            FOR UPDATE OF a
            """
        ),
        {"job": job_id, "token": lease_token, "secret_hash": secret_hash},
    )
    return result.mappings().first()


async def save_session(
    conn: AsyncConnection, account_id: int, sealed_state: bytes, expected_version: int | None
) -> int | None:
    """Write the merged state as the next version; None if another writer got there first.

    ``expected_version`` None means "no session yet": only a first insert is allowed then, so a
    session cleared (deleted) after the caller read it is never brought back by an update.
    """
    result = await conn.execute(
        text(
            """
            WITH updated AS (
                -- the next version, only over the version the caller merged into
                UPDATE sessions
                SET storage_state = :state, version = version + 1, updated_at = now()
                WHERE account_id = :account AND version = CAST(:expected AS integer)
                RETURNING version
            ), inserted AS (
                -- the first version, only when the caller saw none
                INSERT INTO sessions (account_id, storage_state, version)
                SELECT :account, :state, 1 WHERE CAST(:expected AS integer) IS NULL
                ON CONFLICT (account_id) DO NOTHING
                RETURNING version
            )
            SELECT version FROM updated UNION ALL SELECT version FROM inserted
            """
        ),
        {"account": account_id, "state": sealed_state, "expected": expected_version},
    )
    row = result.first()
    return None if row is None else int(row[0])


async def session_of_account(conn: AsyncConnection, site: str, username: str) -> Row | None:
    """An account with its stored session (version, updated_at, sealed state; NULL when none).

    None when the site has no such account.
    """
    result = await conn.execute(
        text(
            """
            SELECT a.id AS account_id, a.status, a.holder_job_id,
                   s.version, s.updated_at, s.storage_state
            FROM accounts a LEFT JOIN sessions s ON s.account_id = a.id
            WHERE a.site = :site AND a.username = :username
            """
        ),
        {"site": site, "username": username},
    )
    return result.mappings().first()


async def clear_session(conn: AsyncConnection, site: str, username: str) -> Row | None:
    """Delete an account's stored session; its version and the account's holder, or None if
    it had none. The next grant of the account carries no session."""
    result = await conn.execute(
        text(
            """
            DELETE FROM sessions s USING accounts a
            WHERE s.account_id = a.id AND a.site = :site AND a.username = :username
            RETURNING a.id AS account_id, a.holder_job_id, s.version
            """
        ),
        {"site": site, "username": username},
    )
    return result.mappings().first()
