"""Blocks with a cooldown end by themselves (the block-cooldowns sweep); blocks without one stay.

The clock moves with ``run_once(now=…)``: the sweep's statements read ``coalesce(:now, now())``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database, accounts
from reapers.block_cooldowns import BlockCooldowns
from schemas.states import AccountStatus
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


async def block(
    processor: RequestProcessor,
    settings: Settings,
    engine: AsyncEngine,
    job_id: str,
    **fields: object,
) -> None:
    """Start ``job_id`` (granted at once) and finish it as blocked."""
    await processor.process(start(settings, job_id))
    lease = await held_lease(engine, settings, job_id)
    await processor.process(
        request(
            settings,
            "job.finish",
            job_id,
            **lease,
            outcome="blocked",
            reason="captcha",
            **fields,
        )
    )
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"


async def account_events(engine: AsyncEngine, settings: Settings) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :t ORDER BY id"),
            {"t": settings.topic("events")},
        )
        types = [json.loads(bytes(r[0]))["type"] for r in rows]
    return [t for t in types if t.startswith("account.")]


async def set_block_cooldown(engine: AsyncEngine, seconds: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE sites SET block_cooldown_seconds = :s"), {"s": seconds})


async def test_a_collectors_block_cooldown_returns_the_account_and_grants_the_waiter_once(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await block(processor, settings, engine, "blocker", cooldown_seconds=120)
    await processor.process(start(settings, "waiter"))
    sweep = BlockCooldowns(settings, db)

    assert (await sweep.run_once(now=await db_now(engine) + timedelta(seconds=100))).changed == []
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"

    later = await db_now(engine) + timedelta(seconds=121)
    result = await sweep.run_once(now=later)
    assert len(result.changed) == 1
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'waiter'") == "RUNNING"
    assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "waiter"
    assert await scalar(engine, "SELECT blocked_until FROM accounts") is None
    assert [r["type"] for r in await replies(engine, settings, "waiter")] == [
        "job.queued",
        "job.granted",
    ]
    assert "account.unblocked" in await account_events(engine, settings)
    assert (await sweep.run_once(now=later)).changed == []  # exactly once


async def test_the_sites_block_cooldown_applies_when_the_collector_names_none(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await set_block_cooldown(engine, 600)
    await block(processor, settings, engine, "blocker")
    sweep = BlockCooldowns(settings, db)

    assert (await sweep.run_once(now=await db_now(engine) + timedelta(seconds=590))).changed == []
    result = await sweep.run_once(now=await db_now(engine) + timedelta(seconds=601))
    assert len(result.changed) == 1
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
    assert await scalar(engine, "SELECT blocked_reason FROM accounts") is None


async def test_a_block_without_a_cooldown_stays_for_the_operator(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await set_block_cooldown(engine, 0)
    await block(processor, settings, engine, "blocker")
    far = await db_now(engine) + timedelta(days=365)

    assert (await BlockCooldowns(settings, db).run_once(now=far)).changed == []
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"
    assert await scalar(engine, "SELECT blocked_until FROM accounts") is None


async def test_an_operators_block_stays_even_after_a_collectors_cooldown_would_have_ended(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await block(processor, settings, engine, "blocker", cooldown_seconds=60)
    async with engine.begin() as conn:  # the operator unblocks, then blocks for good
        for target in (AccountStatus.ACTIVE, AccountStatus.BLOCKED):
            moved = await accounts.set_account_status(
                conn, site="board", username="user0@board", target=target, reason="operator"
            )
            assert moved is not None
    far = await db_now(engine) + timedelta(days=1)

    assert (await BlockCooldowns(settings, db).run_once(now=far)).changed == []
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"


async def test_a_stale_page_entry_changes_nothing_once_the_account_was_granted_and_blocked_again(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await block(processor, settings, engine, "first", cooldown_seconds=60)
    later = await db_now(engine) + timedelta(seconds=61)
    async with engine.connect() as conn:
        (stale,) = await accounts.find_ended_blocks(conn, now=later, after=0, limit=10)
    async with engine.begin() as conn:
        await accounts.set_account_status(
            conn, site="board", username="user0@board", target=AccountStatus.ACTIVE
        )
    await block(processor, settings, engine, "second", cooldown_seconds=60)  # a new token

    async with engine.begin() as conn:
        assert await accounts.end_block(conn, stale["id"], stale["lease_token"], later) is None
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"


async def test_two_reapers_end_one_block_exactly_once(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, db: Database
) -> None:
    await make_site(engine, settings)
    await block(processor, settings, engine, "blocker", cooldown_seconds=60)
    await processor.process(start(settings, "waiter"))
    later = await db_now(engine) + timedelta(seconds=61)

    first, second = await asyncio.gather(
        BlockCooldowns(settings, db).run_once(now=later),
        BlockCooldowns(settings, db).run_once(now=later),
    )

    assert len(first.changed) + len(second.changed) == 1
    assert await scalar(engine, "SELECT count(*) FROM job_grants WHERE job_id = 'waiter'") == 1
    assert (await account_events(engine, settings)).count("account.unblocked") == 1
