"""One lock order (docs/design.md) under real concurrent transactions: mixed request shapes on
the same jobs never deadlock, and a repeated request's answer never overtakes a newer one."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import (
    cancel,
    lease_fields,
    make_site,
    replies,
    request,
    scalar,
    sealed_state,
    start,
)
from workers.requests import Incoming, RequestProcessor

ROUNDS = 6
HEARTBEATS = 3  # per job and round, racing its upload and its finish or cancel
JOBS_PER_SITE = 4
SITES = ("alpha", "beta")


async def deadlocks(engine: AsyncEngine) -> int:
    """Deadlocks PostgreSQL detected in this test's database so far."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_stat_force_next_flush()"))
        await conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        value = await conn.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )
    return int(value or 0)


def cookie(n: int) -> dict[str, Any]:
    return {"cookies": [{"name": f"c{n}", "value": str(n), "domain": "x.example", "path": "/"}]}


async def test_mixed_shapes_on_the_same_jobs_never_deadlock(
    engine: AsyncEngine, settings: Settings
) -> None:
    for slug in SITES:
        await make_site(engine, settings, slug, capacity=2, n_accounts=2, lease_seconds=60)
    db = Database(engine)
    alone = RequestProcessor(settings.model_copy(update={"worker_batch_max": 1}), db)
    shared = RequestProcessor(
        settings.model_copy(update={"worker_batch_max": 8, "worker_transactions": 2}), db
    )
    reaper = ExpiredLeases(settings, db)
    rng = random.Random(11)
    before = await deadlocks(engine)
    upload_key = None
    for round_ in range(ROUNDS):
        starts = [
            start(settings, f"r{round_}-{slug}-{n}", site=slug)
            for slug in SITES
            for n in range(JOBS_PER_SITE)
        ]
        await asyncio.gather(*(rng.choice((alone, shared)).process(r) for r in starts))
        grants = [r for r in await replies(engine, settings) if r["type"] == "job.granted"]
        upload_key = upload_key or grants[0]["upload_key"]
        live = {
            g["job_id"]: lease_fields(g) for g in grants if g["job_id"].startswith(f"r{round_}-")
        }
        follow_ups: list[Incoming] = []
        for n, (job_id, lease) in enumerate(live.items()):
            follow_ups += [
                *(
                    request(settings, "job.heartbeat", job_id, **lease, extend_seconds=60)
                    for _ in range(HEARTBEATS)
                ),
                request(
                    settings,
                    "session.upload",
                    job_id,
                    **lease,
                    storage_state=sealed_state(cookie(n), "session.upload", job_id, upload_key),
                ),
                request(
                    settings,
                    "job.finish",
                    job_id,
                    **lease,
                    outcome=rng.choice(("succeeded", "failed")),
                    session_state=sealed_state(cookie(n + 100), "job.finish", job_id, upload_key),
                )
                if n % 2
                else cancel(settings, job_id, **lease),
            ]
        waiting = [r.key.decode() for r in starts if r.key and r.key.decode() not in live]
        follow_ups += [cancel(settings, job_id) for job_id in waiting[:2]]
        follow_ups += [starts[0]]  # a repeat
        rng.shuffle(follow_ups)
        await asyncio.gather(
            *(rng.choice((alone, shared)).process(r) for r in follow_ups),
            reaper.run_once(),
        )
    assert await deadlocks(engine) == before
    # and every rule still holds: nothing held by a job that is not running
    assert (
        await scalar(
            engine,
            "SELECT count(*) FROM accounts a LEFT JOIN jobs j ON j.id = a.holder_job_id"
            " WHERE a.status = 'USING' AND j.status IS DISTINCT FROM 'RUNNING'",
        )
        == 0
    )
    assert (
        await scalar(
            engine,
            "SELECT count(*) FROM sites s WHERE running <>"
            " (SELECT count(*) FROM jobs j WHERE j.site = s.slug AND j.status = 'RUNNING')",
        )
        == 0
    )


async def outbox_order(engine: AsyncEngine, settings: Settings, job_id: str) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :t AND key = :k ORDER BY id"),
            {"t": settings.topic("replies"), "k": job_id.encode()},
        )
        return [json.loads(bytes(payload))["type"] for (payload,) in rows]


async def test_a_repeated_start_racing_its_grant_never_sends_a_stale_queued_after_it(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, lease_seconds=60)
    db = Database(engine)
    alone = RequestProcessor(settings.model_copy(update={"worker_batch_max": 1}), db)
    for round_ in range(ROUNDS * 2):
        holder, waiter = f"holder-{round_}", f"waiter-{round_}"
        await alone.process(start(settings, holder))
        waiting = start(settings, waiter)
        await alone.process(waiting)
        [grant] = [r for r in await replies(engine, settings, holder) if r["type"] == "job.granted"]
        ending = request(settings, "job.finish", holder, **lease_fields(grant), outcome="succeeded")
        # the grant of the waiter (by the holder's finish) races repeats of the waiter's start,
        # each in a transaction of its own
        await asyncio.gather(alone.process(ending), *(alone.process(waiting) for _ in range(3)))
        order = await outbox_order(engine, settings, waiter)
        settled = [n for n, kind in enumerate(order) if kind in ("job.granted", "job.rejected")]
        assert settled, order
        assert "job.queued" not in order[settled[0] :], order
        final = [r for r in await replies(engine, settings, waiter) if r["type"] == "job.granted"]
        lease = lease_fields(final[0])
        await alone.process(request(settings, "job.finish", waiter, **lease, outcome="succeeded"))
