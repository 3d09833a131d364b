"""Prepared statements (app.store.prepared) sent by asyncpg inside SQLAlchemy's transaction: their failures
are SQLAlchemy's DBAPIError as before, classified and described the same way and without the
statement's values, and their effects belong to the caller's transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import Disposition, classify, describe
from app.lease_secrets import lease_secret_hash, new_lease_secret
from app.settings import Settings
from app.store import jobs
from tests.support.leasing import CANARY, COLLECTOR_PUBLIC_KEY, make_site, scalar

SECRET_HASH = lease_secret_hash(new_lease_secret())


def queue(job_id: str, site: str = "board") -> dict[str, object]:
    return {
        "job_id": job_id,
        "site": site,
        "collector": CANARY,
        "needs_account": False,
        "needs_seeds": 0,
        "lease_seconds": 60,
        "wait_seconds": 60,
        "request_id": "0190d3c8-0000-7000-8000-000000000001",
        "reply_to": "replies",
        "correlation_id": "x",
        "public_key": COLLECTOR_PUBLIC_KEY,
    }


async def test_a_failing_hot_statement_raises_a_described_dbapi_error_without_its_values(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 1"))  # SQLAlchemy began the transaction
        with pytest.raises(DBAPIError) as caught:
            await jobs.queue_job(conn, **queue("job-1", site="nowhere"))  # type: ignore[arg-type]
        await conn.rollback()
    error = caught.value
    assert classify(error) is Disposition.UNEXPECTED
    described = describe(error)
    assert "SQLSTATE 23503" in described and "jobs_site_fkey" in described
    assert CANARY not in str(error) and CANARY not in described


async def test_a_hot_statement_that_waits_past_the_lock_timeout_is_transient(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    async with engine.begin() as conn:
        assert await jobs.queue_job(conn, **queue("job-1")) is not None  # type: ignore[arg-type]
        granted = await jobs.grant_next_waiting(conn, "board", SECRET_HASH)
        assert granted is not None
    async with engine.connect() as holder, engine.connect() as waiter:
        await holder.execute(text("SELECT 1 FROM jobs WHERE id = 'job-1' FOR UPDATE"))
        await waiter.execute(text("SET LOCAL lock_timeout = '100ms'"))
        with pytest.raises(DBAPIError) as caught:
            await jobs.finish_job(
                waiter, "job-1", granted["lease_token"], SECRET_HASH, "SUCCEEDED", None
            )
        await waiter.rollback()
        await holder.rollback()
    assert classify(caught.value) is Disposition.TRANSIENT
    assert "SQLSTATE 55P03" in describe(caught.value)


async def test_a_hot_statement_takes_effect_only_if_its_transaction_commits(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert await jobs.queue_job(conn, **queue("rolled-back")) is not None  # type: ignore[arg-type]
        await conn.rollback()
    async with engine.begin() as conn:
        # the first statement of this transaction: it goes through SQLAlchemy, which begins it
        assert await jobs.queue_job(conn, **queue("kept")) is not None  # type: ignore[arg-type]
    ids = await scalar(engine, "SELECT string_agg(id, ',' ORDER BY id) FROM jobs")
    assert ids == "kept"


async def test_a_statement_cached_before_a_migration_changed_its_table_fails_transiently(
    engine: AsyncEngine, settings: Settings
) -> None:
    # a migration run while workers run (a rolling upgrade) changes what a cached statement
    # returns: the driver drops its cache and the next try prepares it again, so it is retried
    # in place, never dead-lettered as unexpected
    await make_site(engine, settings)
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.execute(text("SELECT 1"))
            assert await jobs.queue_job(conn, **queue("job-1")) is not None  # type: ignore[arg-type]
            assert await jobs.describe_job(conn, "job-1") is not None  # through SQLAlchemy
        async with engine.begin() as other:
            await other.execute(text("ALTER TABLE jobs ADD COLUMN added_later integer"))
        with pytest.raises(DBAPIError) as caught:
            async with conn.begin():
                await conn.execute(text("SELECT 1"))
                await jobs.queue_job(conn, **queue("job-2"))  # type: ignore[arg-type]
        assert classify(caught.value) is Disposition.TRANSIENT
        with pytest.raises(DBAPIError) as caught:
            async with conn.begin():
                await jobs.describe_job(conn, "job-1")
        assert classify(caught.value) is Disposition.TRANSIENT
        async with conn.begin():  # the next try prepares the statement again
            await conn.execute(text("SELECT 1"))
            assert await jobs.queue_job(conn, **queue("job-2")) is not None  # type: ignore[arg-type]
