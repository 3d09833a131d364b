"""Seeds against the real database and the real claim worker: hand-out, fencing, results, release.

Exclusivity is read from ``seed_assignments`` (every hold of a seed with its clock times): no two
holds of one seed overlap, and a hold ends in the transaction that ends its lease.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database, domains, seeds
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import cancel, lease_fields, make_site, replies, request, scalar, start
from workers.requests import RequestProcessor


@pytest.fixture
def processor(settings: Settings, engine: AsyncEngine) -> RequestProcessor:
    return RequestProcessor(settings.model_copy(update={"worker_batch_max": 1}), Database(engine))


async def add_seeds(
    engine: AsyncEngine, n: int, *, site: str = "board", priority: Any = 0, interval: int = 3600
) -> list[int]:
    """``n`` seeds due now; ``priority`` a number or a function of the seed's index."""
    ids = []
    async with engine.begin() as conn:
        for i in range(n):
            row = await seeds.add_seed(
                conn,
                site=site,
                url=f"https://{site}.example.com/board/{i}",
                interval_seconds=interval,
                priority=priority(i) if callable(priority) else priority,
            )
            assert row is not None
            ids.append(int(row["id"]))
    return ids


async def last_reply(engine: AsyncEngine, settings: Settings, job_id: str) -> dict[str, Any]:
    return (await replies(engine, settings, job_id))[-1]


async def begin(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, job_id: str, n: int
) -> dict[str, Any]:
    """A job without an account that asks for ``n`` seeds; its grant."""
    await processor.process(start(settings, job_id, needs={"account": False, "seeds": n}))
    grant = await last_reply(engine, settings, job_id)
    assert grant["type"] == "job.granted", grant
    return grant


def claim(settings: Settings, job_id: str, lease: dict[str, Any], limit: int) -> Any:
    return request(settings, "seeds.claim", job_id, **lease, limit=limit)


def finish(
    settings: Settings, job_id: str, lease: dict[str, Any], results: list[dict[str, Any]]
) -> Any:
    return request(
        settings,
        "job.finish",
        job_id,
        **lease,
        outcome="succeeded",
        seed_results=results or None,
    )


async def assert_no_seed_held_twice(engine: AsyncEngine) -> None:
    """From the history: the holds of each seed follow one another, never overlapping."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT seed_id, assigned_at, ended_at FROM seed_assignments "
                    "ORDER BY seed_id, assigned_at"
                )
            )
        ).all()
    previous: dict[int, datetime | None] = {}
    for seed_id, assigned_at, ended_at in rows:
        if seed_id in previous:
            ended = previous[seed_id]
            assert ended is not None and ended <= assigned_at, f"seed {seed_id} held twice"
        previous[seed_id] = ended_at


async def test_twenty_concurrent_collectors_share_sixty_seeds_without_ever_holding_one_twice(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=20, n_accounts=0)
    ids = await add_seeds(engine, 60, priority=lambda i: i % 3)
    for round_ in range(4):
        jobs = [f"r{round_}-c{n}" for n in range(20)]
        starts = [start(settings, j, needs={"account": False, "seeds": 2}) for j in jobs]
        await asyncio.gather(*(processor.process(s) for s in starts))
        grants = {j: await last_reply(engine, settings, j) for j in jobs}
        assert all(g["type"] == "job.granted" for g in grants.values())
        # 40 asked with the grants, then each asks for 5 more at once: 20 more are due
        await asyncio.gather(
            *(processor.process(claim(settings, j, lease_fields(grants[j]), 5)) for j in jobs)
        )
        handed = {j: [s["id"] for s in grants[j]["seeds"]] for j in jobs}
        for j in jobs:
            claimed = await last_reply(engine, settings, j)
            assert claimed["type"] == "seeds.claimed"
            handed[j] += [s["id"] for s in claimed["seeds"]]
        all_handed = [int(s) for held in handed.values() for s in held]
        assert sorted(all_handed) == sorted(ids)  # every due seed, each to one job
        assert all(len(grants[j]["seeds"]) == 2 for j in jobs)  # the grant's own ask came first
        # half report success and are due again at once, half finish without reporting
        await asyncio.gather(
            *(
                processor.process(
                    finish(
                        settings,
                        j,
                        lease_fields(grants[j]),
                        [{"seed_id": s, "ok": True, "next_due_seconds": 0} for s in handed[j]]
                        if n % 2
                        else [],
                    )
                )
                for n, j in enumerate(jobs)
            )
        )
        assert await scalar(engine, "SELECT count(*) FROM seeds WHERE status = 'ACTIVE'") == 60
    assert await scalar(engine, "SELECT count(*) FROM seed_assignments") == 4 * 60
    assert await scalar(engine, "SELECT count(*) FROM seed_assignments WHERE ended_at IS NULL") == 0
    await assert_no_seed_held_twice(engine)


async def test_seeds_go_out_by_priority_then_due_time_even_to_concurrent_claimers(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=21, n_accounts=0)
    ids = await add_seeds(engine, 60, priority=lambda i: i % 4)
    async with engine.begin() as conn:  # older due times first within a priority
        await conn.execute(text("UPDATE seeds SET next_due_at = now() - make_interval(secs => id)"))
    grants = [await begin(processor, engine, settings, f"job-{n}", 0) for n in range(20)]
    await asyncio.gather(
        *(processor.process(claim(settings, g["job_id"], lease_fields(g), 2)) for g in grants)
    )
    handed = set()
    for g in grants:
        claimed = await last_reply(engine, settings, g["job_id"])
        handed |= {int(s["id"]) for s in claimed["seeds"]}
    order = sorted(ids, key=lambda i: (-((i - ids[0]) % 4), -i))
    assert handed == set(order[:40])
    lone = await begin(processor, engine, settings, "lone", 0)
    await processor.process(claim(settings, "lone", lease_fields(lone), 3))
    got = [int(s["id"]) for s in (await last_reply(engine, settings, "lone"))["seeds"]]
    assert got == order[40:43]


async def test_none_due_is_an_empty_claim_not_an_error(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)
    grant = await begin(processor, engine, settings, "job-1", 3)
    assert grant["seeds"] == []
    await processor.process(claim(settings, "job-1", lease_fields(grant), 5))
    reply = await last_reply(engine, settings, "job-1")
    assert reply["type"] == "seeds.claimed" and reply["seeds"] == []


async def test_a_zombie_with_a_stale_token_cannot_claim_report_or_release_seeds(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=2, n_accounts=0, lease_seconds=60)
    await add_seeds(engine, 4)
    zombie = await begin(processor, engine, settings, "zombie", 2)
    later = await scalar(engine, "SELECT now() + interval '61 seconds'")
    assert (await ExpiredLeases(settings, Database(engine)).run_once(now=later)).changed == [
        "zombie"
    ]
    holder = await begin(processor, engine, settings, "holder", 4)
    assert {s["id"] for s in zombie["seeds"]} <= {s["id"] for s in holder["seeds"]}
    old = lease_fields(zombie)
    # the zombie's collector starts the job again: a new lease; the old token still acts
    await processor.process(start(settings, "zombie", needs={"account": False, "seeds": 0}))
    results = [{"seed_id": s["id"], "ok": False} for s in holder["seeds"]]
    await processor.process(claim(settings, "zombie", old, 5))
    assert (await last_reply(engine, settings, "zombie"))["reason"] == "stale_token"
    await processor.process(finish(settings, "zombie", old, results))
    assert (await last_reply(engine, settings, "zombie"))["type"] == "job.lease_lost"
    await processor.process(cancel(settings, "zombie", **old))
    assert (await last_reply(engine, settings, "zombie"))["type"] == "job.lease_lost"
    async with engine.connect() as conn:
        rows = (
            await conn.execute(text("SELECT status::text, holder_job_id, failure_count FROM seeds"))
        ).all()
    assert rows and all(tuple(r) == ("ASSIGNED", "holder", 0) for r in rows)
    await assert_no_seed_held_twice(engine)


async def test_results_set_the_next_due_time_back_off_on_failure_and_disable_at_the_nth(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    processor.settings = processor.settings.model_copy(
        update={"seed_failures_to_disable": 3, "seed_backoff_seconds": 100}
    )
    processor.services = processor.services.__class__(
        processor.settings, processor.services.secrets
    )
    await make_site(engine, settings, capacity=3, n_accounts=0)
    good, wish, bad = await add_seeds(engine, 3, interval=600)

    async def due_in(seed: int) -> float:
        sql = "SELECT extract(epoch FROM next_due_at - now()) FROM seeds WHERE id = :id"
        return float(await scalar(engine, sql, id=seed))

    for attempt in range(1, 4):
        job = f"job-{attempt}"
        grant = await begin(processor, engine, settings, job, 3)
        assert {int(s["id"]) for s in grant["seeds"]} == {good, wish, bad}
        await processor.process(
            finish(
                settings,
                job,
                lease_fields(grant),
                [
                    {"seed_id": str(good), "ok": True},
                    {"seed_id": str(wish), "ok": True, "next_due_seconds": 42},
                    {"seed_id": str(bad), "ok": False, "reason": f"HTTP 50{attempt}"},
                ],
            )
        )
        assert 595 < await due_in(good) <= 600
        assert 37 < await due_in(wish) <= 42
        if attempt < 3:
            assert 100 * 2 ** (attempt - 1) - 5 < await due_in(bad) <= 100 * 2 ** (attempt - 1)
        async with engine.begin() as conn:  # time passes: all three are due again
            await conn.execute(text("UPDATE seeds SET next_due_at = now()"))
    async with engine.connect() as conn:
        status, reason, failures = (
            await conn.execute(
                text(
                    "SELECT status::text, disabled_reason, failure_count FROM seeds WHERE id = :id"
                ),
                {"id": bad},
            )
        ).one()
    assert (status, failures) == ("DISABLED", 3)
    assert reason == "failed 3 times in a row (last: HTTP 503)"
    grant = await begin(processor, engine, settings, "job-4", 3)
    assert {int(s["id"]) for s in grant["seeds"]} == {good, wish}


async def test_an_expired_leases_seeds_are_due_again_when_the_reaper_reclaims_it(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0, lease_seconds=30)
    await add_seeds(engine, 3)
    grant = await begin(processor, engine, settings, "job-1", 3)
    reaper = ExpiredLeases(settings, Database(engine))
    now = await scalar(engine, "SELECT now()")
    assert (await reaper.run_once(now=now)).changed == []
    assert await scalar(engine, "SELECT count(*) FROM seeds WHERE status = 'ASSIGNED'") == 3
    bound = now + timedelta(seconds=30 + settings.reaper_interval_seconds)
    assert (await reaper.run_once(now=bound)).changed == ["job-1"]
    sql = "SELECT count(*) FROM seeds WHERE status = 'ACTIVE' AND next_due_at <= :t"
    assert await scalar(engine, sql, t=bound) == 3
    ends = "SELECT array_agg(DISTINCT end_reason) FROM seed_assignments"
    assert await scalar(engine, ends) == ["expired"]
    await processor.process(claim(settings, "job-1", lease_fields(grant), 3))
    assert (await last_reply(engine, settings, "job-1"))["type"] == "job.lease_lost"


async def test_a_cancelled_jobs_seeds_go_back_at_once(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)
    await add_seeds(engine, 2)
    grant = await begin(processor, engine, settings, "job-1", 2)
    assert grant["seeds"]
    await processor.process(cancel(settings, "job-1", **lease_fields(grant)))
    assert await scalar(engine, "SELECT count(*) FROM seeds WHERE status = 'ACTIVE'") == 2
    assert await scalar(engine, "SELECT array_agg(DISTINCT end_reason) FROM seed_assignments") == [
        "cancelled"
    ]


async def test_granted_and_claimed_urls_are_rewritten_and_the_rule_counts_them(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)
    await add_seeds(engine, 3)
    async with engine.begin() as conn:
        await domains.add_rewrite(
            conn, site="board", from_host="board.example.com", to_host="board.example.net"
        )
    grant = await begin(processor, engine, settings, "job-1", 2)
    await processor.process(claim(settings, "job-1", lease_fields(grant), 2))
    claimed = await last_reply(engine, settings, "job-1")
    urls = [s["url"] for s in grant["seeds"] + claimed["seeds"]]
    assert len(urls) == 3
    assert all(u.startswith("https://board.example.net/board/") for u in urls)
    async with engine.connect() as conn:
        [rule] = await domains.list_rewrites(conn, "board")
    assert rule["urls_rewritten"] == 3
    events = await scalar(
        engine,
        "SELECT count(*) FROM outbox WHERE topic = :t AND convert_from(payload, 'UTF8') "
        "LIKE '%seed.assigned%'",
        t=settings.topic("events"),
    )
    assert events == 3


async def test_a_claim_racing_the_finish_of_its_job_never_leaves_a_seed_with_a_finished_holder(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=0)
    await add_seeds(engine, 50)
    for n in range(10):
        grant = await begin(processor, engine, settings, f"job-{n}", 0)
        lease = lease_fields(grant)
        await asyncio.gather(
            processor.process(claim(settings, f"job-{n}", lease, 5)),
            processor.process(finish(settings, f"job-{n}", lease, [])),
        )
        answer = [
            r for r in await replies(engine, settings, f"job-{n}") if r["type"] != "job.granted"
        ]
        assert sorted(r["type"] for r in answer) in (
            ["job.finished", "seeds.claimed"],  # the claim went first: the finish released it
            ["job.finished", "job.lease_lost"],  # the finish went first: the claim took nothing
        )
        assert await scalar(engine, "SELECT count(*) FROM seeds WHERE status = 'ASSIGNED'") == 0
    await assert_no_seed_held_twice(engine)
