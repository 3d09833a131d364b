"""Rate-limit scopes (docs/policy.md): a ``job.finish`` with outcome ``rate_limited`` rests the
account for one scope until its reset and leaves it grantable for the others; the job ends FAILED
as a blocked one does. Real PostgreSQL; races as real concurrent transactions."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.capacity_back import CapacityBack
from tests.support.leasing import db_now, held_lease, make_site, replies, request, scalar, start
from tests.support.policy import answer, finish
from workers.requests import RequestProcessor


async def rate_limit(
    processor: RequestProcessor,
    settings: Settings,
    engine: AsyncEngine,
    job_id: str,
    scope: str | None,
    **fields: Any,
) -> None:
    """Start ``job_id`` with ``scope`` (granted at once) and finish it rate-limited."""
    await processor.process(start(settings, job_id, scope=scope))
    assert (await answer(engine, settings, job_id))["type"] == "job.granted"
    fields.setdefault("retry_after_seconds", 600)
    await finish(processor, settings, engine, job_id, outcome="rate_limited", **fields)


async def test_a_rate_limited_scope_waits_for_its_reset_while_other_scopes_are_granted(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    await rate_limit(processor, settings, engine, "search-1", "search", reason="429")

    job = await status_and_reason(engine, "search-1")
    assert job == ("FAILED", "rate_limited: 429")  # as a blocked job ends
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
    await processor.process(start(settings, "profile-1", scope="profile"))
    assert (await answer(engine, settings, "profile-1"))["type"] == "job.granted"
    await finish(processor, settings, engine, "profile-1")
    await processor.process(start(settings, "search-now", scope="search", wait_seconds=0))
    assert (await answer(engine, settings, "search-now"))["reason"] == "rate_limited"
    await processor.process(start(settings, "search-2", scope="search"))
    queued = await answer(engine, settings, "search-2")
    assert (queued["type"], queued["reason"]) == ("job.queued", "rate_limited")

    sweep = CapacityBack(settings, db)
    now = await db_now(engine)
    assert (await sweep.run_once(now=now + timedelta(seconds=590))).changed == []
    assert (await sweep.run_once(now=now + timedelta(seconds=601))).changed == ["search-2"]


async def status_and_reason(engine: AsyncEngine, job_id: str) -> tuple[str, str]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT status::text, reason FROM jobs WHERE id = :id"), {"id": job_id}
            )
        ).one()
        return str(row[0]), str(row[1])


async def test_a_rate_limit_without_a_scope_rests_the_account_for_every_scope_until_reset_at(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    reset_at = await db_now(engine) + timedelta(seconds=300)
    await rate_limit(
        processor, settings, engine, "any", None, retry_after_seconds=None,
        reset_at=reset_at.isoformat(),
    )  # fmt: skip

    for job_id, scope in (("scoped", "search"), ("unscoped", None)):
        await processor.process(start(settings, job_id, scope=scope, wait_seconds=0))
        assert (await answer(engine, settings, job_id))["reason"] == "rate_limited"
    await processor.process(start(settings, "later", scope="profile"))
    sweep = CapacityBack(settings, db)
    assert (await sweep.run_once(now=reset_at - timedelta(seconds=1))).changed == []
    assert (await sweep.run_once(now=reset_at + timedelta(seconds=1))).changed == ["later"]


async def test_a_rate_limit_names_the_jobs_own_scope_when_the_finish_names_none(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    await rate_limit(processor, settings, engine, "search-1", "search")
    # a finish may name another scope than its job's: the rest is for the scope it names
    await processor.process(start(settings, "profile-1", scope="profile"))
    await finish(
        processor, settings, engine, "profile-1", outcome="rate_limited", scope="media",
        retry_after_seconds=60,
    )  # fmt: skip

    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT scope FROM account_scope_rests ORDER BY scope"))
        assert [row[0] for row in rows] == ["media", "search"]
    events = [r for r in await replies(engine, settings) if r["type"] == "job.granted"]
    assert len(events) == 2


async def test_concurrent_starts_never_grant_a_rate_limited_scope_before_its_reset(
    settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=20, n_accounts=3)
    processor = RequestProcessor(settings, db)
    for n in range(3):  # every account rate-limited for search (each job takes the next account)
        await rate_limit(processor, settings, engine, f"limit-{n}", "search")
    assert await scalar(engine, "SELECT count(*) FROM account_scope_rests") == 3
    workers = [RequestProcessor(settings, db) for _ in range(12)]
    scopes = ["search", "profile"] * 6

    await asyncio.gather(
        *(
            w.process(start(settings, f"{scope}-{n}", scope=scope, wait_seconds=0))
            for n, (w, scope) in enumerate(zip(workers, scopes, strict=True))
        )
    )

    async with engine.connect() as conn:
        granted = await conn.execute(
            text("SELECT scope FROM job_grants WHERE job_id NOT LIKE 'limit-%'")
        )
        assert sorted(row[0] for row in granted) == ["profile"] * 3  # one per account, no search


async def test_a_rate_limit_from_a_stale_lease_rests_no_scope(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    await processor.process(start(settings, "search-1", scope="search"))
    lease = await held_lease(engine, settings, "search-1")
    await finish(processor, settings, engine, "search-1")
    zombie = request(
        settings, "job.finish", "search-1", **lease, outcome="rate_limited", retry_after_seconds=600
    )
    await processor.process(zombie)  # the same lease, after its finish

    assert [r["type"] for r in await replies(engine, settings, "search-1")][-1] == "job.lease_lost"
    assert await scalar(engine, "SELECT count(*) FROM account_scope_rests") == 0


async def test_a_reset_far_ahead_rests_the_scope_thirty_days_at_most(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    far = await db_now(engine) + timedelta(days=365)
    await rate_limit(
        processor, settings, engine, "search-1", "search", retry_after_seconds=None,
        reset_at=far.isoformat(),
    )  # fmt: skip

    days = await scalar(
        engine, "SELECT extract(epoch FROM rest_until - now()) / 86400 FROM account_scope_rests"
    )
    assert 29.9 < float(days) <= 30.0
