"""Round trips to the database per request of a job's cycle (start, heartbeat, finish), counted
on the real database: alone, a request costs BEGIN, one statement that locks its site and claims
its inbox row, its transition's statements, one outbox insert and COMMIT; in a shared transaction
the first, the outbox insert, BEGIN and COMMIT are paid once for all its requests, and so are the
transitions: one statement queues all its starts, one extends all its heartbeats' leases, one ends
all its finishes' jobs and one releases their leases."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import make_engine
from app.settings import Settings
from app.store import Database
from tests.support.leasing import lease_fields, make_site, replies, request, start
from tests.support.statements import Statements
from workers.requests import Incoming, RequestProcessor

JOBS = 8
SITES = 4


async def cycle_round_trips(
    engine: AsyncEngine, settings: Settings, batch: int
) -> dict[str, dict[str, int]]:
    """Round trips of JOBS starts (each granted), then their heartbeats, then their finishes,
    each kind sent together to a worker that shares a transaction among ``batch`` requests."""
    ids = [f"b{batch}-job-{n}" for n in range(JOBS)]
    counted: dict[str, dict[str, int]] = {}
    own = make_engine(settings, pool_size=JOBS, pre_ping=False)  # as the claim worker's
    statements = Statements(own)  # before the worker's first connection
    # the connections' own set-up is not a request's: each is made before counting
    await asyncio.gather(*(Database(own).ping() for _ in range(JOBS)))
    worker = RequestProcessor(
        settings.model_copy(update={"worker_batch_max": batch, "worker_transactions": 1}),
        Database(own),
    )

    async def send(kind: str, records: list[Incoming]) -> None:
        with statements.counting() as counts:
            outcomes = await asyncio.gather(*(worker.process(r) for r in records))
        assert outcomes == ["replied"] * JOBS
        counted[kind] = dict(counts)

    starts = [
        start(settings, job_id, site=f"site{n % SITES}", needs={"account": True})
        for n, job_id in enumerate(ids)
    ]
    await send("start", starts)
    answers = await replies(engine, settings)
    leases = {r["job_id"]: lease_fields(r) for r in answers if r["type"] == "job.granted"}
    assert set(leases) == set(ids)
    await send(
        "heartbeat",
        [request(settings, "job.heartbeat", j, **leases[j], extend_seconds=120) for j in ids],
    )
    await send(
        "finish",
        [request(settings, "job.finish", j, **leases[j], outcome="succeeded") for j in ids],
    )
    kinds = [r["type"] for r in await replies(engine, settings) if r["job_id"] in leases]
    assert Counter(kinds) == {"job.granted": JOBS, "job.extended": JOBS, "job.finished": JOBS}
    await own.dispose()
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


async def test_a_shared_transaction_pays_one_statement_per_kind_of_transition(
    engine: AsyncEngine, settings: Settings
) -> None:
    for n in range(SITES):
        await make_site(engine, settings, f"site{n}", capacity=JOBS, n_accounts=JOBS)
    counted = await cycle_round_trips(engine, settings, batch=JOBS)
    once = {"BEGIN": 1, "WITH locked AS": 1, "WITH locks AS": 1, "COMMIT": 1}
    # one statement queues every start; a grant is one statement per grant (each picks its
    # account under the site's rules), in one pass per site for the whole transaction
    assert counted["start"] == {**once, "INSERT INTO jobs": 1, "WITH head AS": JOBS}
    assert counted["heartbeat"] == {**once, "WITH heartbeats AS": 1}
    assert counted["finish"] == {**once, "WITH finishes AS": 1, "WITH releases AS": 1}
