"""Use budgets (docs/policy.md): per account N grants or units per sliding window, per site a token
bucket of grants per minute, both in the grant's own statement; a job held for one waits in the
site's line (``job.queued`` says ``budget``) and the capacity-back sweep grants it once it refills.

Real PostgreSQL; races run as real concurrent transactions (a processor each, on separate pooled
connections), as the leasing tests do. The clock moves with the sweep's ``run_once(now=…)``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.capacity_back import CapacityBack
from tests.support.leasing import db_now, held_lease, make_site, replies, request, scalar, start
from tests.support.policy import answer, finish, set_budgets
from workers.requests import RequestProcessor


async def grants_by_account(engine: AsyncEngine) -> Counter[int]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT account_id FROM job_grants"))
        return Counter(int(row[0]) for row in rows)


async def first_grant_at(engine: AsyncEngine) -> datetime:
    value = await scalar(engine, "SELECT min(granted_at) FROM job_grants")
    assert isinstance(value, datetime)
    return value


async def test_an_account_over_its_budget_waits_for_budget_and_the_sweep_grants_when_the_window_slides(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=5, n_accounts=1)
    await set_budgets(engine, account_budget=2, account_budget_seconds=3600)
    for job_id in ("first", "second"):
        await processor.process(start(settings, job_id))
        await finish(processor, settings, engine, job_id)

    await processor.process(start(settings, "third"))

    queued = await answer(engine, settings, "third")
    assert (queued["type"], queued["reason"]) == ("job.queued", "budget")
    sweep = CapacityBack(settings, db)
    window_start = await first_grant_at(engine)
    # the window slides: both grants are still in it a second before the first leaves it
    assert (await sweep.run_once(now=window_start + timedelta(seconds=3599))).changed == []
    assert (await sweep.run_once(now=window_start + timedelta(seconds=3601))).changed == ["third"]
    assert (await answer(engine, settings, "third"))["type"] == "job.granted"


async def test_concurrent_collectors_never_take_an_account_past_its_budget(
    settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=20, n_accounts=3)
    await set_budgets(engine, account_budget=2, account_budget_seconds=3600)
    workers = [RequestProcessor(settings, db) for _ in range(12)]
    jobs = [f"job-{n}" for n in range(12)]

    await asyncio.gather(
        *(w.process(start(settings, j)) for w, j in zip(workers, jobs, strict=True))
    )
    for _ in range(5):  # finish every granted job at once: each release races the others' grants
        running = await running_jobs(engine)
        if not running:
            break
        await asyncio.gather(
            *(finish(w, settings, engine, j) for w, j in zip(workers, running, strict=False))
        )

    counted = await grants_by_account(engine)
    assert sum(counted.values()) == 6 and set(counted.values()) == {2}
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE status = 'QUEUED'") == 6


async def running_jobs(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT id FROM jobs WHERE status = 'RUNNING' ORDER BY id"))
        return [str(row[0]) for row in rows]


async def test_reported_units_count_against_the_account_budget_as_a_running_total(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, capacity=5, n_accounts=1)
    await set_budgets(engine, account_budget=10, account_budget_seconds=3600)
    await processor.process(start(settings, "pages"))
    lease = await held_lease(engine, settings, "pages")
    await processor.process(request(settings, "job.heartbeat", "pages", **lease, units=9))
    # a smaller total later (a lost heartbeat, a restarted counter) takes nothing back
    await finish(processor, settings, engine, "pages", units=3)
    assert await scalar(engine, "SELECT units FROM job_grants WHERE job_id = 'pages'") == 9

    await processor.process(start(settings, "one-more"))
    assert (await answer(engine, settings, "one-more"))["type"] == "job.granted"
    await finish(processor, settings, engine, "one-more")
    await processor.process(start(settings, "over", wait_seconds=0))

    rejected = await answer(engine, settings, "over")
    assert (rejected["type"], rejected["reason"]) == ("job.rejected", "budget")


async def test_a_sites_grants_per_minute_budget_holds_under_concurrent_starts_and_refills(
    settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=100, n_accounts=20)
    await set_budgets(engine, grants_per_minute=3)
    workers = [RequestProcessor(settings, db) for _ in range(10)]

    await asyncio.gather(*(w.process(start(settings, f"job-{n}")) for n, w in enumerate(workers)))

    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 3  # the full bucket
    waiting = [r for r in await replies(engine, settings) if r["type"] == "job.queued"]
    assert len(waiting) == 7 and {r["reason"] for r in waiting} == {"budget"}
    sweep = CapacityBack(settings, db)
    now = await db_now(engine)
    # refilled from the database clock at 3 a minute: one grant every 20 s, never a burst
    assert len((await sweep.run_once(now=now + timedelta(seconds=10))).changed) == 0
    assert len((await sweep.run_once(now=now + timedelta(seconds=21))).changed) == 1
    assert len((await sweep.run_once(now=now + timedelta(seconds=31))).changed) == 0
    assert len((await sweep.run_once(now=now + timedelta(seconds=42))).changed) == 1
    # a quiet spell fills the bucket to a minute's worth, no more
    assert len((await sweep.run_once(now=now + timedelta(seconds=600))).changed) == 3
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 8


async def test_a_site_budget_window_never_grants_more_than_its_bucket_allows(
    settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=100, n_accounts=60)
    await set_budgets(engine, grants_per_minute=6)
    workers = [RequestProcessor(settings, db) for _ in range(6)]
    sweep = CapacityBack(settings, db)
    start_at = await db_now(engine)
    for step in range(1, 13):  # two minutes of the moved clock, starts racing each sweep
        now = start_at + timedelta(seconds=10 * step)
        await asyncio.gather(
            sweep.run_once(now=now),
            *(w.process(start(settings, f"job-{step}-{n}")) for n, w in enumerate(workers)),
        )

    granted = await scalar(engine, "SELECT count(*) FROM job_grants")
    # a minute's burst, then 6 a minute of the two minutes the clock moved (a token a 10 s step)
    assert 12 <= granted <= 6 + 12


async def test_a_site_without_budgets_grants_as_before(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, capacity=3, n_accounts=1)
    for n in range(5):
        await processor.process(start(settings, f"job-{n}"))
        await finish(processor, settings, engine, f"job-{n}")

    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 5
    assert await scalar(engine, "SELECT bucket_tokens FROM sites") is None


async def test_units_from_a_stale_lease_count_nothing_against_the_budget(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, capacity=5, n_accounts=1)
    await set_budgets(engine, account_budget=10)
    await processor.process(start(settings, "pages"))
    lease = await held_lease(engine, settings, "pages")
    wrong = {**lease, "lease_secret": "w" * 43}
    await processor.process(request(settings, "job.heartbeat", "pages", **wrong, units=500))
    await finish(processor, settings, engine, "pages")
    stale = request(settings, "job.heartbeat", "pages", **lease, units=500)  # after the finish
    await processor.process(stale)

    assert await scalar(engine, "SELECT units FROM job_grants WHERE job_id = 'pages'") == 1
