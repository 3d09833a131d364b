"""Sweeps isolate rows: a row whose repair raises on the database is rolled back, logged,
counted and skipped, and the sweep goes on for every other row and site; a hand-off that fails
on the database rolls back alone, so the repair it followed still commits."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.capacity_back import CapacityBack
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import db_now, make_site, replies, scalar, start
from workers.requests import RequestProcessor


def row_failures(sweep: str) -> float:
    value = REGISTRY.get_sample_value("qm_reaper_row_failures_total", {"sweep": sweep})
    return value or 0.0


async def status(engine: AsyncEngine, job_id: str) -> str:
    return str(await scalar(engine, "SELECT status::text FROM jobs WHERE id = :id", id=job_id))


async def refuse(engine: AsyncEngine, table: str, when: str) -> None:
    """A trigger that makes every ``table`` change matching ``when`` raise on the database."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'this row cannot change'; END $$"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER stuck BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW "
                f"WHEN ({when}) EXECUTE FUNCTION refuse()"
            )
        )


async def two_sites_with_holders(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, *, waiters: bool
) -> None:
    for slug in ("a-site", "b-site"):
        await make_site(engine, settings, slug, lease_seconds=60)
        await processor.process(start(settings, f"{slug}-holder", site=slug))
        if waiters:
            await processor.process(start(settings, f"{slug}-waiter", site=slug))


async def test_a_row_that_raises_is_counted_and_skipped_and_the_sweep_reaps_the_rest(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    await two_sites_with_holders(processor, engine, settings, waiters=False)
    # a row no update can change: every reap of it raises
    await refuse(engine, "jobs", "NEW.id = 'a-site-holder'")
    before = row_failures("expired_leases")
    later = await db_now(engine) + timedelta(seconds=61)
    result = await ExpiredLeases(settings, db).run_once(now=later)
    assert result.changed == ["b-site-holder"]
    assert result.failed == ["a-site-holder"]
    assert row_failures("expired_leases") == before + 1
    assert await status(engine, "a-site-holder") == "RUNNING"
    assert await status(engine, "b-site-holder") == "EXPIRED"


async def test_a_hand_off_that_fails_on_the_database_leaves_the_reap_it_followed_committed(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    await two_sites_with_holders(processor, engine, settings, waiters=True)
    await refuse(engine, "job_grants", "NEW.job_id = 'a-site-waiter'")  # its grant cannot happen
    later = await db_now(engine) + timedelta(seconds=61)
    result = await ExpiredLeases(settings, db).run_once(now=later)
    assert sorted(result.changed) == ["a-site-holder", "b-site-holder"] and result.failed == []
    assert await status(engine, "a-site-holder") == "EXPIRED"
    assert [r["type"] for r in await replies(engine, settings, "a-site-holder")][-1] == (
        "job.lease_lost"
    )
    assert await status(engine, "a-site-waiter") == "QUEUED"  # left for capacity-back
    assert await status(engine, "b-site-waiter") == "RUNNING"
    assert await scalar(engine, "SELECT running FROM sites WHERE slug = 'a-site'") == 0
    # capacity-back finds the same grant failing: that site is counted and skipped
    before = row_failures("capacity_back")
    back = await CapacityBack(settings, db).run_once(now=later)
    assert back.failed == ["a-site"] and back.changed == []
    assert row_failures("capacity_back") == before + 1
