"""Proxies of a site: ACTIVE (resting after a failure until ``available_at``) <-> BLOCKED.

An account is pinned to a proxy by its first grant, in the grant's own statement
(``jobs.grant_next_waiting``); here are the operator's moves, a lease's report on its proxy and
the re-pinning of a blocked proxy's accounts. Callers that pin or move accounts hold the site's
lock (``sites.lock_site``), so a proxy's count of accounts cannot be raced past ``max_accounts``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row
from schemas.states import PROXY_TRANSITIONS, ProxyStatus, predecessors

# The rules the grant applies (``jobs.grant_next_waiting``) and ``sites.wait_reason`` explains,
# written once. They name the site ``:site``, the account ``a`` and the grant's clock ``:now``.

# A proxy for an account not pinned yet: the least-loaded ACTIVE, rested proxy of the site with
# room under its max_accounts (the caller holds the site's lock, so the count is exact).
FREE_PROXY_CTE = """
    free_proxy AS (
        SELECT p.id FROM proxies p
        CROSS JOIN LATERAL (SELECT count(*) AS n FROM accounts x WHERE x.proxy_id = p.id) load
        WHERE p.site = :site AND p.status = 'ACTIVE'
          AND p.available_at <= coalesce(CAST(:now AS timestamptz), now())
          AND load.n < p.max_accounts
        ORDER BY load.n, p.id LIMIT 1
    )"""

# The account may go out: a pinned one through its own proxy only, while that is ACTIVE and
# rested; one not pinned yet through a free proxy, or none where the site does not require one.
PROXY_USABLE = """
    CASE WHEN a.proxy_id IS NOT NULL
         THEN EXISTS (SELECT 1 FROM proxies p WHERE p.id = a.proxy_id AND p.status = 'ACTIVE'
                      AND p.available_at <= coalesce(CAST(:now AS timestamptz), now()))
         ELSE EXISTS (SELECT 1 FROM free_proxy)
              OR NOT (SELECT proxy_required FROM sites WHERE slug = :site) END"""

# what lists and events show of a proxy: never its sealed URL
_SHOWN = """p.id, p.site, p.label, p.status, p.max_accounts, p.cooldown_seconds, p.block_after,
            p.available_at, p.consecutive_failures, p.failure_count, p.blocked_reason"""


async def add_proxy(
    conn: AsyncConnection,
    *,
    site: str,
    label: str,
    url_sealed: bytes,
    max_accounts: int = 1,
    cooldown_seconds: int = 300,
    block_after: int = 3,
) -> Row | None:
    """A new ACTIVE proxy of ``site``; None when the site has one with that label already."""
    result = await conn.execute(
        text(
            f"""
            INSERT INTO proxies AS p (site, label, url_sealed, max_accounts, cooldown_seconds,
                                      block_after)
            VALUES (:site, :label, :url_sealed, :max_accounts, :cooldown_seconds, :block_after)
            ON CONFLICT (site, label) DO NOTHING
            RETURNING {_SHOWN}
            """
        ),
        {
            "site": site,
            "label": label,
            "url_sealed": url_sealed,
            "max_accounts": max_accounts,
            "cooldown_seconds": cooldown_seconds,
            "block_after": block_after,
        },
    )
    return result.mappings().first()


async def list_proxies(conn: AsyncConnection, site: str | None = None) -> list[Row]:
    """Proxies without their URLs, with how many accounts each carries (``accounts``) and
    whether it rests after a failure (``resting``)."""
    result = await conn.execute(
        text(
            f"""
            SELECT {_SHOWN},
                   (SELECT count(*) FROM accounts a WHERE a.proxy_id = p.id) AS accounts,
                   (p.status = 'ACTIVE' AND p.available_at > now()) AS resting
            FROM proxies p
            WHERE (CAST(:site AS text) IS NULL OR p.site = :site) ORDER BY p.site, p.id
            """
        ),
        {"site": site},
    )
    return list(result.mappings())


async def remove_proxy(conn: AsyncConnection, *, site: str, label: str) -> Row | None:
    """Delete a proxy; its accounts are unpinned (each is pinned again at its next grant).

    Returns the proxy with how many accounts it carried (``accounts``); None when there is none.
    """
    result = await conn.execute(
        text(
            f"""
            WITH gone AS (
                DELETE FROM proxies p WHERE p.site = :site AND p.label = :label
                RETURNING {_SHOWN}
            )
            -- the foreign key unpins them (ON DELETE SET NULL) as the statement ends
            SELECT gone.*, (SELECT count(*) FROM accounts a WHERE a.proxy_id = gone.id) AS accounts
            FROM gone
            """
        ),
        {"site": site, "label": label},
    )
    return result.mappings().first()


async def set_proxy_status(
    conn: AsyncConnection, *, site: str, label: str, target: ProxyStatus, reason: str | None = None
) -> Row | None:
    """An operator's block (ACTIVE -> BLOCKED) or unblock (BLOCKED -> ACTIVE: in service now,
    its failures in a row forgotten); None when there is no such proxy in a legal predecessor."""
    result = await conn.execute(
        text(
            f"""
            UPDATE proxies p
            SET status = CAST(:target AS proxy_status),
                blocked_reason = CASE WHEN :target = 'BLOCKED' THEN :reason END,
                consecutive_failures = CASE WHEN :target = 'ACTIVE' THEN 0
                                            ELSE p.consecutive_failures END,
                available_at = CASE WHEN :target = 'ACTIVE' THEN now() ELSE p.available_at END,
                updated_at = now()
            WHERE p.site = :site AND p.label = :label
              AND p.status = ANY(CAST(:legal AS proxy_status[]))
            RETURNING {_SHOWN}
            """
        ),
        {
            "site": site,
            "label": label,
            "target": target.value,
            "reason": reason,
            "legal": [s.value for s in predecessors(PROXY_TRANSITIONS, target)],
        },
    )
    return result.mappings().first()


async def report_proxy(
    conn: AsyncConnection, *, lease_token: int, failed: bool, now: datetime | None = None
) -> Row | None:
    """A lease's word on the proxy it was granted with: a failure rests the proxy (its
    ``cooldown_seconds``) and the ``block_after``-th in a row blocks it (ACTIVE -> BLOCKED); a
    lease that went through it fine forgets its failures in a row. A lease's failure counts
    once, however often it reports it. None when nothing changed (no proxy, not ACTIVE, nothing
    to forget). The caller has checked the lease is the holder's."""
    result = await conn.execute(
        text(
            f"""
            WITH reported AS (
                -- a failure is marked on the grant: the same lease reporting again counts nothing
                UPDATE job_grants SET proxy_failed = true
                WHERE lease_token = :lease_token AND :failed AND NOT proxy_failed
                  AND proxy_id IS NOT NULL
                RETURNING proxy_id
            ),
            carried AS (
                SELECT proxy_id FROM job_grants
                WHERE lease_token = :lease_token AND NOT :failed AND NOT proxy_failed
            ),
            proxy AS (
                SELECT proxy_id FROM reported UNION ALL SELECT proxy_id FROM carried
            )
            UPDATE proxies p
            SET consecutive_failures = CASE WHEN :failed THEN p.consecutive_failures + 1 ELSE 0 END,
                failure_count = p.failure_count + CASE WHEN :failed THEN 1 ELSE 0 END,
                available_at = CASE WHEN :failed
                    THEN greatest(p.available_at, coalesce(CAST(:now AS timestamptz), now()) + make_interval(secs => p.cooldown_seconds))
                    ELSE p.available_at END,
                status = CASE WHEN :failed AND p.consecutive_failures + 1 >= p.block_after
                              THEN 'BLOCKED' ELSE p.status END::proxy_status,
                blocked_reason = CASE WHEN :failed AND p.consecutive_failures + 1 >= p.block_after
                                      THEN format('%s failures in a row', p.consecutive_failures + 1)
                                      ELSE p.blocked_reason END,
                updated_at = now()
            FROM proxy
            WHERE p.id = proxy.proxy_id AND p.status = 'ACTIVE'
              AND (:failed OR p.consecutive_failures > 0)
            RETURNING {_SHOWN}
            """
        ),
        {"lease_token": lease_token, "failed": failed, "now": now},
    )
    return result.mappings().first()


async def repin_accounts(
    conn: AsyncConnection, proxy_id: int, now: datetime | None = None
) -> list[Row]:
    """The accounts of a BLOCKED proxy -> pinned to the site's rested ACTIVE proxies with room,
    least loaded first, none past its ``max_accounts``; those that find no room are unpinned
    (pinned again at their next grant). Each row: the account, ``from_proxy``, its new
    ``proxy_id`` and ``proxy_label`` (None when unpinned). Nothing when the proxy is not
    BLOCKED (the staleness test)."""
    result = await conn.execute(
        text(
            """
            WITH old AS (
                SELECT id, site FROM proxies WHERE id = :proxy_id AND status = 'BLOCKED'
            ),
            locked AS (
                -- lock order: the caller holds the site; accounts next, in id order
                SELECT a.id FROM accounts a, old WHERE a.proxy_id = old.id
                ORDER BY a.id FOR UPDATE OF a
            ),
            moving AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM locked),
            slots AS (
                -- every free place on a healthy proxy, numbered so that the first accounts
                -- go one to each proxy, least loaded first, before any takes a second
                SELECT p.id, row_number() OVER (ORDER BY k, load.n, p.id) AS n
                FROM proxies p JOIN old ON p.site = old.site AND p.id <> old.id
                CROSS JOIN LATERAL (SELECT count(*) AS n FROM accounts x
                                    WHERE x.proxy_id = p.id) load
                CROSS JOIN LATERAL generate_series(1, p.max_accounts - load.n) AS k
                WHERE p.status = 'ACTIVE' AND p.available_at <= coalesce(CAST(:now AS timestamptz), now())
            ),
            moved AS (
                UPDATE accounts a SET proxy_id = slots.id, updated_at = now()
                FROM moving LEFT JOIN slots ON slots.n = moving.n
                WHERE a.id = moving.id AND a.proxy_id = :proxy_id
                RETURNING a.id, a.site, a.username, a.status, a.proxy_id
            )
            SELECT moved.*, CAST(:proxy_id AS bigint) AS from_proxy, p.label AS proxy_label
            FROM moved LEFT JOIN proxies p ON p.id = moved.proxy_id ORDER BY moved.id
            """
        ),
        {"proxy_id": proxy_id, "now": now},
    )
    return list(result.mappings())
