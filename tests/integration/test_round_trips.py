"""Round trips to the database per request of a job's cycle (start, heartbeat, finish), counted
on the real database: alone, a request costs BEGIN, one statement that locks its site and claims
its inbox row, its transition's statements, one outbox insert and COMMIT; in a shared transaction
the first, the outbox insert, BEGIN and COMMIT are paid once for all its requests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from tests.support.leasing import make_site, replies, request, start
from workers.requests import Incoming, RequestProcessor

JOBS = 8
SITES = 4


@contextmanager
def round_trips(engine: AsyncEngine) -> Iterator[Counter[str]]:
    """Statements sent on ``engine`` while the block runs, by their first words; BEGIN and
    COMMIT too."""
    counts: Counter[str] = Counter()

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        counts[" ".join(sql.split()[:3])] += 1

    def begin(conn: Any) -> None:
        counts["BEGIN"] += 1

    def commit(conn: Any) -> None:
        counts["COMMIT"] += 1

    listeners = [("before_cursor_execute", statement), ("begin", begin), ("commit", commit)]
    for name, listener in listeners:
        event.listen(engine.sync_engine, name, listener)
    try:
        yield counts
    finally:
        for name, listener in listeners:
            event.remove(engine.sync_engine, name, listener)


async def cycle_round_trips(
    engine: AsyncEngine, settings: Settings, batch: int
) -> dict[str, Counter[str]]:
    """Round trips of JOBS starts (each granted), then their heartbeats, then their finishes,
    each kind sent together to a worker that shares a transaction among ``batch`` requests."""
    worker = RequestProcessor(
        settings.model_copy(update={"worker_batch_max": batch, "worker_transactions": 1}),
        Database(engine),
    )
    ids = [f"b{batch}-job-{n}" for n in range(JOBS)]
    counted: dict[str, Counter[str]] = {}

    async def send(kind: str, records: list[Incoming]) -> None:
        with round_trips(engine) as counts:
            outcomes = await asyncio.gather(*(worker.process(r) for r in records))
        assert outcomes == ["replied"] * JOBS
        counted[kind] = counts

    starts = [
        start(settings, job_id, site=f"site{n % SITES}", needs={"account": True})
        for n, job_id in enumerate(ids)
    ]
    await send("start", starts)
    answers = await replies(engine, settings)
    tokens = {r["job_id"]: r["lease_token"] for r in answers if r["type"] == "job.granted"}
    assert set(tokens) == set(ids)
    await send(
        "heartbeat",
        [
            request(settings, "job.heartbeat", j, lease_token=tokens[j], extend_seconds=120)
            for j in ids
        ],
    )
    await send(
        "finish",
        [
            request(settings, "job.finish", j, lease_token=tokens[j], outcome="succeeded")
            for j in ids
        ],
    )
    kinds = [r["type"] for r in await replies(engine, settings) if r["job_id"] in tokens]
    assert Counter(kinds) == {"job.granted": JOBS, "job.extended": JOBS, "job.finished": JOBS}
    return counted


async def test_a_request_alone_costs_its_transition_and_four_round_trips(
    engine: AsyncEngine, settings: Settings
) -> None:
    for n in range(SITES):
        await make_site(engine, settings, f"site{n}", capacity=JOBS, n_accounts=JOBS)
    counted = await cycle_round_trips(engine, settings, batch=1)
    first = "WITH locked AS"  # the sites' locks and the inbox claim
    outbox = "WITH locks AS"  # the outbox insert with its key locks
    alone = {"BEGIN": JOBS, first: JOBS, outbox: JOBS, "COMMIT": JOBS}
    assert counted["start"] == {**alone, "INSERT INTO jobs": JOBS, "WITH head AS": JOBS}
    assert counted["heartbeat"] == {**alone, "WITH job AS": JOBS}
    # no statement settles seeds when the lease holds none
    assert counted["finish"] == {**alone, "UPDATE jobs j": JOBS, "WITH account AS": JOBS}


async def test_a_shared_transaction_pays_its_first_statement_outbox_insert_and_commit_once(
    engine: AsyncEngine, settings: Settings
) -> None:
    for n in range(SITES):
        await make_site(engine, settings, f"site{n}", capacity=JOBS, n_accounts=JOBS)
    counted = await cycle_round_trips(engine, settings, batch=JOBS)
    once = {"BEGIN": 1, "WITH locked AS": 1, "WITH locks AS": 1, "COMMIT": 1}
    assert counted["start"] == {**once, "INSERT INTO jobs": JOBS, "WITH head AS": JOBS}
    assert counted["heartbeat"] == {**once, "WITH job AS": JOBS}
    assert counted["finish"] == {**once, "UPDATE jobs j": JOBS, "WITH account AS": JOBS}
