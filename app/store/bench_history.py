"""Bench SQL only: history for the benches, written set-based (INSERT … SELECT generate_series)
through the real schema and its indexes, so ten million jobs take minutes.

What a running deployment piles up: finished jobs with their grants, ``job.start`` inbox rows
and a delivered capture each; settled seeds (done, not due again yet) with the holds that did
them and their sites' domain rewrites; many accounts per site.

Nothing here runs in the service; `qm bench lease|seeds|captures --history N` preload their own
database with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

HOLDS_PER_SEED = 10  # a settled seed was done this many times by history jobs
# History seeds take priorities 0..SEED_PRIORITIES-1: one level above the seeds bench's four,
# so a claim on a bench site meets a whole level of seeds that are not due before the due ones
SEED_PRIORITIES = 5
SEED_INTERVAL = 7 * 24 * 3600  # done within the history's span, so none is due yet

# A time-ordered UUID (v7 layout: the millisecond first) for history row ``g`` made at ``t``, as
# the SDK's request ids are (UUIDv7), so the inbox's key grows at its end as it does in service.
_UUID7 = """CAST(lpad(to_hex(CAST(extract(epoch FROM {t}) * 1000 AS bigint)), 12, '0')
                 || '7000' || '8' || lpad(to_hex({g}), 15, '0') AS uuid)"""

_JOBS = text(
    f"""
    WITH job AS (
        INSERT INTO jobs (id, site, collector, status, lease_seconds, lease_token, attempts,
                          request_id, reply_to, correlation_id, created_at, granted_at,
                          finished_at, updated_at)
        SELECT 'history-' || g, (:sites)[1 + g % cardinality(:sites)], 'history', 'SUCCEEDED',
               60, nextval('lease_token_seq'), 1, {_UUID7.format(t="t", g="g")},
               'history.replies', 'history-' || g, t, t, t + interval '1 second',
               t + interval '1 second'
        FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g,
             LATERAL (SELECT now() - make_interval(secs => CAST(:span AS float8) * (1 - g::float8 / CAST(:total AS bigint))) AS t) ts
        RETURNING id, site, lease_token, request_id, created_at, finished_at
    ),
    grant_rows AS (
        INSERT INTO job_grants (lease_token, job_id, site, granted_at, ended_at, end_reason)
        SELECT lease_token, id, site, created_at, finished_at, 'SUCCEEDED' FROM job
    ),
    capture_rows AS (
        -- each job delivered one capture before it finished
        INSERT INTO captures (id, job_id, site, url, storage_uri, sha256, content_type, size,
                              captured_at, status, attempts, next_attempt_at, handoff_token,
                              created_at, updated_at, dispatched_at, handed_off_at)
        SELECT id, id, site, 'https://' || site || '.example.com/items/' || id,
               's3://history/' || id || '.html', md5(id) || md5(site || id), 'text/html', 1024,
               created_at, 'HANDED_OFF', 1, created_at, lease_token, created_at, finished_at,
               created_at, finished_at
        FROM job WHERE CAST(:captures AS boolean)
    )
    INSERT INTO inbox (request_id, job_id, request_type, fingerprint, created_at)
    SELECT request_id, id, 'job.start', 'history', created_at FROM job
    """
).bindparams(bindparam("sites", type_=ARRAY(TEXT)))


async def add_finished_jobs(
    conn: AsyncConnection,
    sites: Sequence[str],
    *,
    first: int,
    last: int,
    total: int,
    span: float,
    captures: bool = False,
) -> None:
    """Finished jobs ``first``..``last`` of ``total``, one grant and one inbox row each (and with
    ``captures`` one delivered capture each), spread over the last ``span`` seconds (job
    ``total`` finished now), round-robin over ``sites``."""
    await conn.execute(text("SET LOCAL work_mem = '256MB'"))  # the CTE's rows stay in memory
    await conn.execute(
        _JOBS,
        {
            "sites": list(sites),
            "first": first,
            "last": last,
            "total": total,
            "span": span,
            "captures": captures,
        },
    )


_REWRITES = text(
    """
    INSERT INTO domain_rewrites (site, from_host, to_host)
    SELECT slug, slug || '.example.com', slug || '.example.net' FROM unnest(:sites) AS slug
    ON CONFLICT (site, from_host) DO NOTHING
    """
).bindparams(bindparam("sites", type_=ARRAY(TEXT)))

# Seed k (of ``seeds`` in all) belongs to site k mod n and was done by the history jobs
# k, k + seeds, k + 2 seeds … (``seeds`` is a multiple of n, so they are jobs of its site).
_SEEDS = text(
    f"""
    WITH seed AS (
        INSERT INTO seeds (site, url, interval_seconds, priority, status, next_due_at,
                           created_at, last_done_at, updated_at)
        SELECT (:sites)[1 + k % cardinality(:sites)],
               'https://' || (:sites)[1 + k % cardinality(:sites)] || '.example.com/history/' || k,
               {SEED_INTERVAL}, k % {SEED_PRIORITIES}, 'ACTIVE',
               done + make_interval(secs => {SEED_INTERVAL}), done - interval '7 days', done, done
        FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS k,
             LATERAL (SELECT now() - make_interval(secs => CAST(:span AS float8) * (1 - k::float8 / CAST(:seeds AS bigint))) AS done) d
        RETURNING id, site, url, last_done_at
    ),
    holds AS (
        INSERT INTO seed_assignments (seed_id, lease_token, job_id, assigned_at, ended_at,
                                      end_reason)
        SELECT seed.id, nextval('lease_token_seq'), 'history-' || job_no,
               seed.last_done_at - make_interval(secs => h), seed.last_done_at
                   - make_interval(secs => h) + interval '1 second', 'done'
        FROM seed,
             LATERAL (SELECT CAST(substring(seed.url FROM '[0-9]+$') AS bigint) AS k) n,
             generate_series(0, {HOLDS_PER_SEED - 1}) AS h,
             LATERAL (SELECT n.k + h * CAST(:seeds AS bigint) AS job_no) j
        WHERE j.job_no <= CAST(:jobs AS bigint)
    )
    INSERT INTO domain_rewrite_uses (rewrite_id, urls, used_at)
    SELECT r.id, {HOLDS_PER_SEED}, seed.last_done_at
    FROM seed JOIN domain_rewrites r ON r.site = seed.site AND r.from_host = seed.site || '.example.com'
    """
).bindparams(bindparam("sites", type_=ARRAY(TEXT)))


def seed_count(jobs: int, sites: int) -> int:
    """How many settled seeds ``jobs`` history jobs did, HOLDS_PER_SEED holds each: a multiple
    of ``sites``, so each seed's holds are jobs of its own site."""
    per_site = -(-jobs // (HOLDS_PER_SEED * sites))
    return per_site * sites


async def add_rewrites(conn: AsyncConnection, sites: Sequence[str]) -> None:
    """A domain rewrite per site (``<slug>.example.com -> .net``) unless it has one already."""
    await conn.execute(_REWRITES, {"sites": list(sites)})


async def add_settled_seeds(
    conn: AsyncConnection,
    sites: Sequence[str],
    *,
    first: int,
    last: int,
    seeds: int,
    jobs: int,
    span: float,
) -> None:
    """Settled seeds ``first``..``last`` of ``seeds`` (``seed_count``): ACTIVE, done over the
    last ``span`` seconds and not due again yet, each with the ended holds of the history jobs
    that did it and a use of its site's domain rewrite (``add_rewrites`` first)."""
    await conn.execute(
        _SEEDS,
        {
            "sites": list(sites),
            "first": first,
            "last": last,
            "seeds": seeds,
            "jobs": jobs,
            "span": span,
        },
    )


async def add_accounts(conn: AsyncConnection, site: str, count: int, sealed_secret: bytes) -> None:
    """``count`` accounts of ``site``, every tenth INACTIVE, the rest ACTIVE, all one secret."""
    await conn.execute(
        text(
            """
            INSERT INTO accounts (site, username, secret, status)
            SELECT :site, 'history' || g || '@' || :site, :secret,
                   CAST(CASE WHEN g % 10 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END AS account_status)
            FROM generate_series(1, CAST(:count AS integer)) AS g
            """
        ),
        {"site": site, "count": count, "secret": sealed_secret},
    )


HISTORY_TABLES = (
    "sites",
    "accounts",
    "jobs",
    "job_grants",
    "inbox",
    "outbox",
    "seeds",
    "seed_assignments",
    "domain_rewrites",
    "domain_rewrite_uses",
    "captures",
)


async def vacuum_analyze(conn: AsyncConnection) -> None:
    """Vacuum (visibility map, hint bits) and fresh statistics for the tables the hot paths
    read, so the autovacuum of a fresh load does not run, and write WAL, inside a measured run.
    ``conn`` must be in autocommit (VACUUM runs outside a transaction)."""
    for table in HISTORY_TABLES:
        await conn.execute(text(f"VACUUM (ANALYZE) {table}"))


async def table_sizes(conn: AsyncConnection) -> dict[str, tuple[int, int]]:
    """Rows (estimated, from the statistics) and bytes with indexes of each history table."""
    result = await conn.execute(
        text(
            """
            SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid)
            FROM pg_class c WHERE c.relname = ANY(:tables) AND c.relkind = 'r'
            """
        ).bindparams(bindparam("tables", type_=ARRAY(TEXT))),
        {"tables": list(HISTORY_TABLES)},
    )
    return {str(name): (max(int(rows), 0), int(size)) for name, rows, size in result}


async def wal_lsn(conn: AsyncConnection) -> int:
    """The current WAL position in bytes (what a run's WAL volume is measured against)."""
    result = await conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    return int(result.scalar_one())


async def checkpoint(conn: AsyncConnection) -> None:
    """A checkpoint now: from here on, the first change of each page writes a full-page image
    into the WAL, as after every checkpoint of a running server."""
    await conn.execute(text("CHECKPOINT"))
