"""Job retention against the real database: only jobs finished before the retention period go,
with their grants, in bounded batches; live jobs and locked rows stay. And the indexes that keep
the leasing path's costs flat as history grows exist."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.settings import Settings
from app.store import Database, retention
from reapers.job_retention import JobRetention
from reapers.runner import job_sweeps
from tests.support.leasing import (
    lease_fields,
    make_site,
    replies,
    request,
    scalar,
    start,
)
from workers.requests import RequestProcessor


async def run_job(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, job_id: str
) -> None:
    await processor.process(start(settings, job_id))
    [grant] = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    finish = request(settings, "job.finish", job_id, **lease_fields(grant), outcome="succeeded")
    await processor.process(finish)


async def backdate(engine: AsyncEngine, seconds: int, *job_ids: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE jobs SET finished_at = finished_at - make_interval(secs => :s) "
                "WHERE id = ANY(:ids)"
            ),
            {"s": seconds, "ids": list(job_ids)},
        )


async def job_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return {str(r[0]) for r in await conn.execute(text("SELECT id FROM jobs"))}


async def test_only_jobs_past_retention_go_with_their_grants_in_bounded_batches(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=1)
    for job_id in ("old-1", "old-2", "old-3", "recent"):
        await run_job(processor, engine, settings, job_id)
    await processor.process(start(settings, "live"))  # RUNNING: holds the one slot
    await processor.process(start(settings, "waiting"))  # QUEUED behind it
    await backdate(engine, settings.job_retention_seconds + 60, "old-1", "old-2", "old-3")
    keep = settings.job_retention_seconds

    async with engine.begin() as conn:
        first = await retention.prune_finished_jobs(conn, keep_seconds=keep, limit=2)
    assert first == ["old-1", "old-2"]  # oldest first, at most the batch
    small = settings.model_copy(update={"job_prune_batch": 1})
    swept = await JobRetention(small, Database(engine)).run_once()
    assert swept.changed == ["old-3"]

    assert await job_ids(engine) == {"recent", "live", "waiting"}
    grants = await scalar(engine, "SELECT array_agg(job_id ORDER BY job_id) FROM job_grants")
    assert grants == ["live", "recent"]


async def test_a_job_another_transaction_holds_is_passed_over_until_released(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=1)
    for job_id in ("held", "free"):
        await run_job(processor, engine, settings, job_id)
    await backdate(engine, settings.job_retention_seconds + 60, "held", "free")
    sweep = JobRetention(settings, Database(engine))
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1 FROM jobs WHERE id = 'held' FOR UPDATE"))
        assert (await sweep.run_once()).changed == ["free"]
        await holder.rollback()
    assert (await sweep.run_once()).changed == ["held"]
    assert await job_ids(engine) == set()


async def test_the_reaper_runs_job_retention(settings: Settings, engine: AsyncEngine) -> None:
    assert "job_retention" in [
        s.name for s in job_sweeps(settings, Database(engine), SecretBox.from_settings(settings))
    ]


async def test_the_indexes_for_flat_costs_exist(engine: AsyncEngine) -> None:
    names = await scalar(engine, "SELECT array_agg(indexname::text) FROM pg_indexes")
    for index in ("accounts_holder", "accounts_grantable", "jobs_finished", "job_grants_job"):
        assert index in names
