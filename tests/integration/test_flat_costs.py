"""Plans that do not grow with history: on a database with finished jobs and many accounts
preloaded and analyzed while no job ran (the statistics a fresh deployment has), the leasing path
finds running jobs by primary key and held accounts by their holder, and the site lock's
"has accounts" check reads one index entry."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database, outbox
from app.store import bench_history as history
from app.store.sites import _LOCK_SITE
from tests.support.leasing import make_site, replies, start
from workers.requests import RequestProcessor

HISTORY_JOBS = 20_000
ACCOUNTS_PER_SITE = 3_000


async def plan(engine: AsyncEngine, sql: str, **params: Any) -> str:
    async with engine.connect() as conn:
        rows = await conn.execute(text(f"EXPLAIN {sql}"), params)
        return "\n".join(str(r[0]) for r in rows)


async def preload(engine: AsyncEngine, settings: Settings) -> None:
    await make_site(engine, settings, "other", capacity=1)
    await make_site(engine, settings, "board", capacity=20, n_accounts=20)
    async with engine.begin() as conn:
        for site in ("other", "board"):  # board's accounts come after all of other's
            await history.add_accounts(conn, site, ACCOUNTS_PER_SITE, b"unused")
        await history.add_finished_jobs(
            conn, ["other", "board"], first=1, last=HISTORY_JOBS, total=HISTORY_JOBS, span=3600.0
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await history.vacuum_analyze(conn)


async def test_the_leasing_path_uses_the_key_and_the_holder_index_whatever_the_statistics(
    settings: Settings, engine: AsyncEngine
) -> None:
    await preload(engine, settings)
    processor = RequestProcessor(settings, Database(engine))
    for n in range(10):  # running jobs the statistics have not seen
        await processor.process(start(settings, f"live-{n}"))
    [grant] = [r for r in await replies(engine, settings, "live-3") if r["type"] == "job.granted"]
    token = grant["lease_token"]

    job_step = await plan(
        engine,
        "UPDATE jobs SET updated_at = now() WHERE id = :id AND status = 'RUNNING'"
        " AND lease_token = :token AND lease_expires_at > clock_timestamp()",
        id="live-3",
        token=token,
    )
    assert "jobs_pkey" in job_step and "jobs_lease_expiry" not in job_step
    account_step = await plan(
        engine,
        "UPDATE accounts SET lease_expires_at = now() WHERE holder_job_id = :id"
        " AND lease_token = :token",
        id="live-3",
        token=token,
    )
    assert "accounts_holder" in account_step
    lock = await plan(engine, _LOCK_SITE.format(which="s.slug = :slug"), slug="board")
    assert "accounts_grantable" in lock and "Seq Scan on accounts" not in lock, lock


async def test_the_expired_leases_sweep_still_reads_the_expiry_index(
    settings: Settings, engine: AsyncEngine
) -> None:
    await preload(engine, settings)
    sweep = await plan(
        engine,
        "SELECT id, site, lease_token FROM jobs WHERE status = 'RUNNING'"
        " AND lease_expires_at < now() AND id > '' AND granted_at IS NOT NULL"
        " ORDER BY id LIMIT 100",
    )
    assert "jobs_lease_expiry" in sweep


@pytest.mark.parametrize("analyzed", ["empty", "full"])
async def test_the_relays_read_of_the_outbox_walks_its_index_past_deleted_rows(
    engine: AsyncEngine, analyzed: str
) -> None:
    # a busy outbox: rows published and deleted faster than autovacuum comes (once a minute at
    # most), analyzed while it was empty or while it held them
    if analyzed == "empty":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE outbox"))
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox (shard, topic, key, headers, payload)"
                " SELECT n % 16, 'replies', NULL, '[]', '{}' FROM generate_series(1, 20000) AS n"
            )
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        if analyzed == "full":
            await conn.execute(text("ANALYZE outbox"))
        await conn.execute(text("DELETE FROM outbox WHERE id % 20 <> 0"))
        await outbox.prepare_relay_session(conn)
        explained = await conn.execute(
            text(f"EXPLAIN {outbox._FETCH_UNSENT.text}"),
            # with rows of rounds in flight to pass over, as a pipelined relay reads
            {"shards": list(range(16)), "limit": 500, "skip_topics": [], "busy": [20, 40, 60]},
        )
        fetch = "\n".join(str(r[0]) for r in explained)
    # an index scan marks the dead entries it passes, so the next read skips them; a bitmap
    # scan visits every dead row again on every read until a vacuum
    assert "Index Scan using outbox_" in fetch and "Bitmap" not in fetch, fetch
