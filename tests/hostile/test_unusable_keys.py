"""Grants that cannot be sealed or opened: a waiting job whose public key X25519 refuses (written
into its row, as the schema now refuses it at the door) and an account whose secret was sealed
with a key since dropped from ``QM_SECRET_KEYS``. Each ends that one job with ``job.rejected``
and a reason; the request, the hand-off and every sweep that granted it go on for the rest."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.settings import Settings
from app.store import Database, accounts, seeds
from reapers.block_cooldowns import BlockCooldowns
from reapers.capacity_back import CapacityBack
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import (
    db_now,
    held_lease,
    make_site,
    make_unreadable_site,
    replies,
    request,
    scalar,
    start,
)
from workers.requests import RequestProcessor

ZERO_KEY = "A" * 43 + "="  # 32 zero bytes: passes the old pattern, X25519 refuses it


async def poison(engine: AsyncEngine, job_id: str) -> None:
    """The waiting job's public key becomes one X25519 refuses (the row as old code kept it)."""
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE jobs SET public_key = :key WHERE id = :id"),
            {"key": ZERO_KEY, "id": job_id},
        )


async def kinds(engine: AsyncEngine, settings: Settings, job_id: str) -> list[tuple[str, Any]]:
    return [(r["type"], r.get("reason")) for r in await replies(engine, settings, job_id)]


async def status(engine: AsyncEngine, job_id: str) -> str:
    return str(await scalar(engine, "SELECT status::text FROM jobs WHERE id = :id", id=job_id))


async def finish(processor: RequestProcessor, engine: AsyncEngine, settings: Settings, job_id: str,
                 **fields: Any) -> None:  # fmt: skip
    lease = await held_lease(engine, settings, job_id)
    fields.setdefault("outcome", "succeeded")
    await processor.process(request(settings, "job.finish", job_id, **lease, **fields))


async def events(engine: AsyncEngine, settings: Settings) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :t ORDER BY id"),
            {"t": settings.topic("events")},
        )
        return [json.loads(bytes(r[0])) for r in rows]


async def test_a_holders_finish_is_answered_when_the_waiter_behind_it_cannot_be_sealed_to(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    async with engine.begin() as conn:
        for n in range(3):
            await seeds.add_seed(
                conn,
                site="board",
                url=f"https://board.example.com/{n}",
                interval_seconds=60,
                priority=0,
            )
    await processor.process(start(settings, "holder"))
    await processor.process(start(settings, "bad", needs={"account": True, "seeds": 2}))
    await processor.process(start(settings, "good", needs={"account": True, "seeds": 2}))
    await poison(engine, "bad")
    await finish(processor, engine, settings, "holder")
    assert (await kinds(engine, settings, "holder"))[-1] == ("job.finished", None)
    assert (await kinds(engine, settings, "bad"))[-1] == ("job.rejected", "unusable_public_key")
    assert await status(engine, "bad") == "FAILED"
    # what the bad job was granted went back and on to the next waiter
    [(granted, _)] = (await kinds(engine, settings, "good"))[-1:]
    assert granted == "job.granted"
    assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "good"
    assert await scalar(engine, "SELECT running FROM sites") == 1
    held = "SELECT count(*) FROM seeds WHERE holder_job_id = :id"
    assert await scalar(engine, held, id="good") == 2
    assert await scalar(engine, held, id="bad") == 0
    assert (
        await scalar(
            engine, "SELECT count(*) FROM job_grants WHERE job_id = 'bad' AND ended_at IS NULL"
        )
        == 0
    )
    terminal = [e for e in await events(engine, settings) if e.get("id") == "bad"]
    assert terminal[-1]["status"] == "FAILED" and terminal[-1]["reason"] == "unusable_public_key"


async def test_an_account_sealed_with_a_dropped_key_is_marked_and_the_rest_keep_being_granted(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, qm: Any
) -> None:
    await make_unreadable_site(engine, settings, "locked")
    async with engine.begin() as conn:  # a second account there, sealed with today's key
        box = SecretBox.from_settings(settings)
        await accounts.add_account(
            conn, site="locked", username="fine@locked", sealed_secret=box.seal("fine")
        )
    await make_site(engine, settings, "board")
    await processor.process(start(settings, "first", site="locked"))
    assert await kinds(engine, settings, "first") == [("job.rejected", "account_unreadable")]
    assert await status(engine, "first") == "FAILED"
    lost = await scalar(
        engine, "SELECT status::text || ' ' || blocked_reason FROM accounts WHERE username = :u",
        u="lost@locked",
    )  # fmt: skip
    assert lost.startswith("INACTIVE ") and "QM_SECRET_KEYS" in lost
    assert await scalar(engine, "SELECT running FROM sites WHERE slug = 'locked'") == 0
    marked = [e for e in await events(engine, settings) if e["type"] == "account.unreadable"]
    assert [(e["status"], e["job_id"]) for e in marked] == [("INACTIVE", "first")]
    # the other account of the site, and every other site, keep being granted
    await processor.process(start(settings, "second", site="locked"))
    assert [k for k, _ in await kinds(engine, settings, "second")] == ["job.granted"]
    await processor.process(start(settings, "elsewhere", site="board"))
    assert [k for k, _ in await kinds(engine, settings, "elsewhere")] == ["job.granted"]
    # and an operator sees which account and why
    listed = (await qm("accounts", "list", "locked")).stdout
    assert "lost@locked" in listed and "INACTIVE" in listed and "QM_SECRET_KEYS" in listed


async def test_the_expired_leases_sweep_goes_on_past_a_site_whose_waiter_cannot_be_sealed_to(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    for slug in ("a-site", "b-site"):
        await make_site(engine, settings, slug, lease_seconds=60)
        await processor.process(start(settings, f"{slug}-holder", site=slug))
        await processor.process(start(settings, f"{slug}-waiter", site=slug))
    await poison(engine, "a-site-waiter")
    later = await db_now(engine) + timedelta(seconds=61)
    result = await ExpiredLeases(settings, db).run_once(now=later)
    assert sorted(result.changed) == ["a-site-holder", "b-site-holder"]
    assert await status(engine, "a-site-holder") == "EXPIRED"
    assert await status(engine, "b-site-holder") == "EXPIRED"
    assert (await kinds(engine, settings, "a-site-waiter"))[-1] == (
        "job.rejected",
        "unusable_public_key",
    )
    assert (await kinds(engine, settings, "b-site-waiter"))[-1][0] == "job.granted"
    assert await scalar(engine, "SELECT running FROM sites WHERE slug = 'a-site'") == 0


async def test_capacity_back_and_block_cooldowns_go_on_past_a_waiter_that_cannot_be_sealed_to(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    # a-site and b-site: the account rests after its holder's finish; c-site and d-site: it is
    # blocked with a cooldown. On a-site and c-site the first waiter's key is refused.
    for slug in ("a-site", "b-site", "c-site", "d-site"):
        await make_site(engine, settings, slug, cooldown_seconds=60)
        await processor.process(start(settings, f"{slug}-holder", site=slug))
        await processor.process(start(settings, f"{slug}-first", site=slug))
        await processor.process(start(settings, f"{slug}-second", site=slug))
        blocked = (
            {"outcome": "blocked", "cooldown_seconds": 60} if slug in ("c-site", "d-site") else {}
        )
        await finish(processor, engine, settings, f"{slug}-holder", **blocked)
    await poison(engine, "a-site-first")
    await poison(engine, "c-site-first")
    later = await db_now(engine) + timedelta(seconds=61)
    ended = await BlockCooldowns(settings, db).run_once(now=later)
    assert len(ended.changed) == 2
    back = await CapacityBack(settings, db).run_once(now=later)
    assert sorted(back.changed) == ["a-site-second", "b-site-first"]
    for slug, granted in (("a", "second"), ("b", "first"), ("c", "second"), ("d", "first")):
        last = (await kinds(engine, settings, f"{slug}-site-{granted}"))[-1]
        assert last[0] == "job.granted", (slug, last)
    for slug in ("a", "c"):
        assert (await kinds(engine, settings, f"{slug}-site-first"))[-1] == (
            "job.rejected",
            "unusable_public_key",
        )
