"""Use budgets and scope rests (docs/policy.md): the rules the grant statement applies, the rests
a rate limit leaves, the units a lease reports, and why a site's line waits.

The rules are SQL predicates, written once here and used by the grant statement
(``app.store.jobs``) and by ``why_waiting``, so what holds a job back and what the collector is
told are the same rule. Every one reads the grant's clock, ``policy.at`` (the database's
``clock_timestamp()`` once the site's lock is held, or a test's ``:now``). They name what the
statements that use them name: the CTEs ``head`` (the site's oldest waiting job) and ``policy``,
the account ``a`` and the site ``s``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store import proxies
from app.store.prepared import Prepared

# The site's budgets and the grant's clock, read once per statement (a CTE with a volatile
# function is evaluated once). The caller holds the site's lock, so they cannot change meanwhile.
POLICY_CTE = """
    policy AS (
        SELECT s.account_budget, s.account_budget_seconds, s.grants_per_minute,
               coalesce(CAST(:now AS timestamptz), clock_timestamp()) AS at
        FROM sites s WHERE s.slug = :site
    )"""

# A rest a rate limit left for every scope of an account (no scope was named)
ALL_SCOPES = "*"

# Scopes: the account does not rest for the head job's scope, nor for all scopes. A job without
# a scope is held back only by a rest for all scopes.
SCOPE_FREE = f"""
    NOT EXISTS (SELECT 1 FROM account_scope_rests r
                WHERE r.account_id = a.id AND r.scope IN ((SELECT scope FROM head), '{ALL_SCOPES}')
                  AND r.rest_until > (SELECT at FROM policy))"""

# The account's budget: the units of its grants in the sliding window (policy.at - S, policy.at]
# stay under N; a grant counts 1 until its lease reports more. The index job_grants_account_window
# reads only the window's grants.
WITHIN_BUDGET = """
    ((SELECT account_budget FROM policy) IS NULL
     OR (SELECT coalesce(sum(g.units), 0) FROM job_grants g
         WHERE g.account_id = a.id
           AND g.granted_at > (SELECT at - make_interval(secs => account_budget_seconds)
                               FROM policy))
        < (SELECT account_budget FROM policy))"""

# The site's budget, a token bucket whose state is the site's row: ``bucket_tokens`` at
# ``bucket_at``, refilled at grants_per_minute / 60 a second up to a minute's worth; a site never
# granted yet starts full. ``s`` is the site's row.
BUCKET_REFILLED = """
    least(s.grants_per_minute::float8,
          coalesce(s.bucket_tokens, s.grants_per_minute)
          + s.grants_per_minute
            * greatest(0, extract(epoch FROM (SELECT at FROM policy) - coalesce(s.bucket_at,
                                                                     (SELECT at FROM policy))))
            / 60.0)"""

# The site's budget allows a grant: a whole token in its bucket (or no bucket at all)
BUCKET_HAS_TOKEN = f"(s.grants_per_minute IS NULL OR {BUCKET_REFILLED} >= 1)"

# The bucket after a grant took a token (NULLs while the site has none)
BUCKET_AFTER_GRANT = f"""
    bucket_tokens = CASE WHEN s.grants_per_minute IS NOT NULL THEN {BUCKET_REFILLED} - 1 END,
    bucket_at = CASE WHEN s.grants_per_minute IS NOT NULL
                     THEN greatest(s.bucket_at, (SELECT at FROM policy)) END"""


_WHY_WAITING = text(
    f"""
    WITH head AS (
        SELECT id, needs_account, scope FROM jobs
        WHERE site = :site AND status = 'QUEUED'
        ORDER BY queue_seq LIMIT 1
    ),
    {POLICY_CTE.strip()},
    {proxies.FREE_PROXY_CTE.strip()},
    rested AS (
        -- the accounts the grant would look at, with what each rule says of them
        SELECT {SCOPE_FREE} AS scope_free, {WITHIN_BUDGET} AS within_budget,
               {proxies.PROXY_USABLE} AS proxy_usable
        FROM accounts a
        WHERE a.site = :site AND a.status = 'ACTIVE'
          AND a.available_at <= coalesce(CAST(:now AS timestamptz), now())
    )
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM head) THEN NULL
        WHEN s.running >= s.capacity THEN 'capacity'
        WHEN NOT {BUCKET_HAS_TOKEN} THEN 'budget'
        WHEN NOT (SELECT needs_account FROM head) THEN 'capacity'
        WHEN NOT EXISTS (SELECT 1 FROM rested) THEN 'accounts'
        -- proxies: rested accounts there are, but none may go out (app.store.proxies)
        WHEN NOT EXISTS (SELECT 1 FROM rested WHERE proxy_usable) THEN 'proxy'
        WHEN NOT EXISTS (SELECT 1 FROM rested WHERE proxy_usable AND scope_free)
            THEN 'rate_limited'
        WHEN NOT EXISTS (SELECT 1 FROM rested WHERE proxy_usable AND scope_free AND within_budget)
            THEN 'budget'
        ELSE 'accounts'
    END AS reason
    FROM sites s WHERE s.slug = :site
    """
)


async def why_waiting(conn: AsyncConnection, site: str, now: datetime | None = None) -> str | None:
    """What holds the site's line (its oldest waiting job) now: ``capacity``, ``accounts``,
    ``budget``, ``rate_limited`` or ``proxy``; None when nothing waits."""
    result = await conn.execute(_WHY_WAITING, {"site": site, "now": now})
    value = result.scalar()
    return None if value is None else str(value)


_REST_SCOPE = text(
    """
    INSERT INTO account_scope_rests AS r (account_id, scope, rest_until)
    VALUES (:account_id, :scope,
            CASE WHEN CAST(:reset_at AS timestamptz) IS NOT NULL
                 THEN least(CAST(:reset_at AS timestamptz), now() + interval '30 days')
                 ELSE now() + make_interval(secs => :retry_after) END)
    ON CONFLICT (account_id, scope) DO UPDATE
    -- two limits of one scope: the later reset holds
    SET rest_until = greatest(r.rest_until, excluded.rest_until)
    RETURNING rest_until
    """
)


async def rest_scope(
    conn: AsyncConnection,
    *,
    account_id: int,
    scope: str,
    retry_after_seconds: int | None,
    reset_at: datetime | None,
) -> datetime:
    """The account rests for ``scope`` (``ALL_SCOPES``: for every one) until ``reset_at``, or
    ``retry_after_seconds`` from now by the database clock; a later rest already kept holds.
    The caller released the account for the lease holder in this transaction (the fence)."""
    result = await conn.execute(
        _REST_SCOPE,
        {
            "account_id": account_id,
            "scope": scope,
            "reset_at": reset_at,
            "retry_after": retry_after_seconds or 0,
        },
    )
    until = result.scalar_one()
    assert isinstance(until, datetime)
    return until


_RECORD_UNITS = Prepared(
    text(
        """
        UPDATE job_grants SET units = greatest(units, :units)
        WHERE lease_token = :lease_token AND job_id = :job_id AND ended_at IS NULL
        """
    )
)


async def record_units(conn: AsyncConnection, *, job_id: str, lease_token: int, units: int) -> None:
    """The units a live lease used so far (a running total): its grant counts that many against
    its account's budget, never fewer than before. The caller fenced the lease in this
    transaction (a heartbeat's extension or a finish of the holder)."""
    await _RECORD_UNITS.execute(
        conn, {"units": units, "lease_token": lease_token, "job_id": job_id}
    )
