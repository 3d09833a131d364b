"""The claim worker's group commit against the real database: requests that arrive together share
a transaction, a failure inside one costs nobody else their answer, and shared transactions over
many sites run side by side without deadlocks."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from app.settings import Settings
from app.store import Database
from tests.support.leasing import (
    held_lease,
    make_failing_site,
    make_site,
    replies,
    request,
    scalar,
    start,
)
from workers.requests import RequestProcessor


def processor(settings: Settings, engine: AsyncEngine, **knobs: int) -> RequestProcessor:
    return RequestProcessor(settings.model_copy(update=knobs), Database(engine))


async def running_jobs(engine: AsyncEngine, settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """Each running job with the fields its follow-ups present."""
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT id FROM jobs WHERE status = 'RUNNING'"))
        job_ids = [job_id for (job_id,) in rows]
    return [(job_id, await held_lease(engine, settings, job_id)) for job_id in job_ids]


def carried(committed: str) -> tuple[float, float]:
    """(transactions, requests) the claim worker's transactions metric counted so far."""
    labels = {"committed": committed}
    count = REGISTRY.get_sample_value("qm_requests_per_transaction_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("qm_requests_per_transaction_sum", labels) or 0.0


async def transactions_of(engine: AsyncEngine) -> int:
    """How many transactions wrote the inbox rows (rows written by one share its xmin)."""
    return int(await scalar(engine, "SELECT count(DISTINCT xmin::text) FROM inbox"))


async def test_requests_that_arrive_together_share_transactions_of_at_most_the_batch_size(
    engine: AsyncEngine, settings: Settings
) -> None:
    for slug in ("alpha", "beta", "gamma"):
        await make_site(engine, settings, slug, capacity=2, n_accounts=2)
    worker = processor(settings, engine, worker_batch_max=8, worker_transactions=1)
    records = [
        start(settings, f"job-{n}", site=("alpha", "beta", "gamma")[n % 3]) for n in range(20)
    ]
    before = carried("true")
    outcomes = await asyncio.gather(*(worker.process(r) for r in records))
    assert outcomes == ["replied"] * 20
    assert await transactions_of(engine) == 3  # 8 + 8 + 4
    after = carried("true")
    assert (after[0] - before[0], after[1] - before[1]) == (3, 20)
    kinds = [r["type"] for r in await replies(engine, settings)]
    assert kinds.count("job.granted") == 6 and kinds.count("job.queued") == 14
    assert await scalar(engine, "SELECT max(running) FROM sites") == 2


async def test_a_request_that_fails_inside_a_shared_transaction_is_dead_lettered_alone(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=6, n_accounts=6)
    await make_failing_site(engine, settings, "locked")
    worker = processor(settings, engine, worker_batch_max=32, worker_transactions=1)
    records = [start(settings, f"job-{n}") for n in range(6)]
    records.insert(3, start(settings, "unreadable", site="locked"))
    before = carried("false")
    with capture_logs() as logs:
        outcomes = await asyncio.gather(*(worker.process(r) for r in records))
    assert outcomes == ["replied"] * 3 + ["dead_lettered"] + ["replied"] * 3
    after = carried("false")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 7)
    assert "shared_transaction_failed" in [entry["event"] for entry in logs]
    granted = [r["job_id"] for r in await replies(engine, settings) if r["type"] == "job.granted"]
    assert sorted(granted) == [f"job-{n}" for n in range(6)]
    # an unexpected failure ends in a dead letter and request.failed: nothing of it was done
    [failed] = await replies(engine, settings, "unreadable")  # its final answer: nothing done
    assert failed["type"] == "request.failed"
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE id = 'unreadable'") == 0
    assert await scalar(engine, "SELECT running FROM sites WHERE slug = 'locked'") == 0
    dead = await scalar(
        engine, "SELECT count(*) FROM outbox WHERE topic = :t", t=settings.topic("requests.dlt")
    )
    assert dead == 1


async def test_side_by_side_shared_transactions_over_many_sites_keep_every_rule_and_never_deadlock(
    engine: AsyncEngine, settings: Settings
) -> None:
    slugs = [f"site-{n}" for n in range(6)]
    for slug in slugs:
        await make_site(engine, settings, slug, capacity=2, n_accounts=3)
    worker = processor(settings, engine, worker_batch_max=5, worker_transactions=3)
    rng = random.Random(7)
    jobs = {f"job-{n}": rng.choice(slugs) for n in range(60)}
    with capture_logs() as logs:
        await asyncio.gather(*(worker.process(start(settings, j, site=s)) for j, s in jobs.items()))
        for _ in range(len(jobs)):  # finish the running jobs in waves; the waiting ones move up
            running = await running_jobs(engine, settings)
            if not running:
                break
            rng.shuffle(running)
            finishes = [
                request(settings, "job.finish", job_id, **lease, outcome=outcome)
                for job_id, lease in running
                for outcome in [rng.choice(["succeeded", "failed"])]
            ]
            await asyncio.gather(*(worker.process(f) for f in finishes))
    assert "shared_transaction_failed" not in [entry["event"] for entry in logs]
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE status = 'QUEUED'") == 0
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE status = 'RUNNING'") == 0
    assert await scalar(engine, "SELECT sum(running) FROM sites") == 0
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE status = 'USING'") == 0
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE status = 'SUCCEEDED'") > 0
    overlapping = await scalar(
        engine,
        """
        SELECT count(*) FROM job_grants a JOIN job_grants b
          ON a.account_id = b.account_id AND a.job_id < b.job_id
         AND tstzrange(a.granted_at, a.ended_at) && tstzrange(b.granted_at, b.ended_at)
        """,
    )
    assert overlapping == 0
    assert await transactions_of(engine) < len(jobs)


async def test_a_request_right_after_the_last_transaction_ended_is_not_left_waiting(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=3, n_accounts=3)
    worker = processor(settings, engine, worker_batch_max=32, worker_transactions=1)
    async with asyncio.timeout(30):  # in this task: each request arrives in the very loop
        for n in range(3):  # step in which the transaction before it hands back its outcome
            assert await worker.process(start(settings, f"job-{n}")) == "replied"
    assert await transactions_of(engine) == 3
