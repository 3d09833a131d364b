"""The job reaper against the real database: each orphan shape recovers once, with its replies.

Long waits use time travel (``run_once(now=…)`` moves the database clock of the sweep).
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.capacity_back import CapacityBack
from reapers.expired_leases import ExpiredLeases
from reapers.overdue_waits import OverdueWaits
from tests.support.leasing import (
    db_now,
    held_lease,
    make_site,
    replies,
    request,
    scalar,
    start,
)
from workers.requests import RequestProcessor


async def job_events(engine: AsyncEngine, settings: Settings) -> list[dict]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :t ORDER BY id"),
            {"t": settings.topic("job-events")},
        )
        return [json.loads(bytes(r[0])) for r in rows]


async def test_an_expired_lease_is_reclaimed_and_its_slot_handed_to_the_oldest_waiter(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, lease_seconds=60)
    await processor.process(start(settings, "dead"))
    await processor.process(start(settings, "waiter"))
    later = await db_now(engine) + timedelta(seconds=61)
    assert (await ExpiredLeases(settings, db).run_once(now=await db_now(engine))).changed == []
    result = await ExpiredLeases(settings, db).run_once(now=later)
    assert result.changed == ["dead"]
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'dead'") == "EXPIRED"
    assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "waiter"
    assert [r["type"] for r in await replies(engine, settings, "dead")] == [
        "job.granted",
        "job.lease_lost",
    ]
    assert [r["type"] for r in await replies(engine, settings, "waiter")] == [
        "job.queued",
        "job.granted",
    ]
    # it may run again (its collector may start it again): no terminal event for sensors
    assert await job_events(engine, settings) == []
    assert "job.expired" in await scalar(
        engine,
        "SELECT string_agg(convert_from(payload, 'UTF8'), ' ') FROM outbox WHERE topic = :t",
        t=settings.topic("events"),
    )
    assert (await ExpiredLeases(settings, db).run_once(now=later)).changed == []  # exactly once


async def test_a_waiting_job_past_its_deadline_is_rejected_as_timed_out(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "holder"))
    await processor.process(start(settings, "patient", wait_seconds=30))
    assert (await OverdueWaits(settings, db).run_once(now=await db_now(engine))).changed == []
    result = await OverdueWaits(settings, db).run_once(
        now=await db_now(engine) + timedelta(seconds=31)
    )
    assert result.changed == ["patient"]
    answers = await replies(engine, settings, "patient")
    assert [(r["type"], r.get("reason")) for r in answers] == [
        ("job.queued", "capacity"),  # what holds the line
        ("job.rejected", "timed_out"),
    ]
    assert [e["type"] for e in await job_events(engine, settings)] == ["job.timed_out"]


async def test_waiting_jobs_are_granted_within_one_sweep_when_a_cooldown_ends(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, capacity=2, cooldown_seconds=300)
    await processor.process(start(settings, "first"))
    await processor.process(start(settings, "second"))
    await processor.process(start(settings, "third"))
    lease = await held_lease(engine, settings, "first")
    await processor.process(request(settings, "job.finish", "first", **lease, outcome="succeeded"))
    assert (await CapacityBack(settings, db).run_once()).changed == []  # still resting
    result = await CapacityBack(settings, db).run_once(
        now=await db_now(engine) + timedelta(seconds=301)
    )
    assert result.changed == ["second"]  # FIFO; capacity 2 but one account
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'third'") == "QUEUED"


async def test_an_operator_unblock_lets_a_waiting_job_through_within_one_sweep(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "blocker"))
    await processor.process(start(settings, "waiter"))
    lease = await held_lease(engine, settings, "blocker")
    await processor.process(
        request(
            settings,
            "job.finish",
            "blocker",
            **lease,
            outcome="blocked",
            reason="captcha",
        )
    )
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"
    assert (await CapacityBack(settings, db).run_once()).changed == []
    async with engine.begin() as conn:
        from app.store.accounts import set_account_status
        from schemas.states import AccountStatus

        await set_account_status(
            conn, site="board", username="user0@board", target=AccountStatus.ACTIVE
        )
    assert (await CapacityBack(settings, db).run_once()).changed == ["waiter"]


async def test_a_job_whose_holders_keep_dying_stops_at_its_attempt_cap(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, max_attempts=2, lease_seconds=60)
    reaper = ExpiredLeases(settings, db)
    for _attempt in range(2):
        await processor.process(start(settings, "cursed"))
        assert await scalar(engine, "SELECT status::text FROM jobs") == "RUNNING"
        await reaper.run_once(now=await db_now(engine) + timedelta(seconds=61))
    assert (
        await scalar(engine, "SELECT status::text || ':' || reason FROM jobs")
        == "FAILED:attempts_exhausted"
    )
    await processor.process(start(settings, "cursed"))
    assert (await replies(engine, settings, "cursed"))[-1]["reason"] == "attempts_exhausted"
    # exactly one terminal event, and one dead letter with the qm.dlt.* headers
    assert [e["type"] for e in await job_events(engine, settings)] == ["job.failed"]
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT key, headers, payload FROM outbox WHERE topic = :t"),
            {"t": settings.topic("requests.dlt")},
        )
        [(key, headers, payload)] = list(rows)
    assert bytes(key) == b"cursed"
    named = {name: base64.b64decode(value).decode() for name, value in headers}
    assert named["qm.dlt.error_class"] == "app.leasing.AttemptsExhausted"
    assert named["qm.dlt.original_topic"] == settings.topic("requests")
    assert named["qm.dlt.attempts"] == "2" and "lapsed 2 times" in named["qm.dlt.error_message"]
    dead = json.loads(bytes(payload))
    assert (dead["id"], dead["status"], dead["reason"]) == (
        "cursed",
        "FAILED",
        "attempts_exhausted",
    )
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"


async def test_two_reapers_and_a_finishing_collector_race_to_one_outcome(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, lease_seconds=60)
    await processor.process(start(settings, "job-1"))
    lease = await held_lease(engine, settings, "job-1")
    later = await db_now(engine) + timedelta(seconds=61)
    finish = request(settings, "job.finish", "job-1", **lease, outcome="succeeded")
    first, second, _ = await asyncio.gather(
        ExpiredLeases(settings, db).run_once(now=later),
        ExpiredLeases(settings, db).run_once(now=later),
        processor.process(finish),
    )
    status = await scalar(engine, "SELECT status::text FROM jobs")
    assert len(first.changed) + len(second.changed) == (1 if status == "EXPIRED" else 0)
    kinds = [r["type"] for r in await replies(engine, settings, "job-1")][1:]
    assert kinds in (["job.finished"], ["job.lease_lost", "job.lease_lost"])
    assert await scalar(engine, "SELECT count(*) FROM job_grants WHERE ended_at IS NOT NULL") == 1
    assert await scalar(engine, "SELECT running FROM sites") == 0
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"


async def test_a_collector_finishing_after_its_lease_was_reaped_gets_lease_lost_and_changes_nothing(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings, lease_seconds=60, cooldown_seconds=0)
    await processor.process(start(settings, "slow"))
    lease = await held_lease(engine, settings, "slow")
    await ExpiredLeases(settings, db).run_once(now=await db_now(engine) + timedelta(seconds=61))
    errors = await scalar(engine, "SELECT error_count FROM accounts")
    await processor.process(request(settings, "job.finish", "slow", **lease, outcome="blocked"))
    assert (await replies(engine, settings, "slow"))[-1] == {
        **(await replies(engine, settings, "slow"))[-1],
        "type": "job.lease_lost",
        "reason": "job_expired",
    }
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
    assert await scalar(engine, "SELECT error_count FROM accounts") == errors
