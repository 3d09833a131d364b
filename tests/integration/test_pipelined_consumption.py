"""Pipelined consumption against the real broker and database: one partition keeps many records
in flight in side-by-side transactions and commits its offsets in order, and a failed shared
transaction's requests, going alone, keep each job's order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options, ensure_topics, producer_options
from app.root import Wiring
from app.settings import Settings
from app.store import Database
from tests.support.leasing import (
    cancel,
    make_failing_site,
    make_site,
    replies,
    scalar,
    start,
)
from tests.support.waiting import eventually
from workers.consuming import Subscription, pipelined
from workers.requests import Parsed, RequestProcessor

RECORDS = 300


class Watched:
    """Counts the transactions a processor runs at once and the requests they carry."""

    def __init__(self, processor: RequestProcessor) -> None:
        self.running: list[int] = []
        self.most_transactions = 0
        self.most_requests = 0
        self.transactions = 0
        transact: Callable[[list[Parsed]], Awaitable[list[str]]] = processor._transact

        async def watched(requests: list[Parsed]) -> list[str]:
            self.running.append(len(requests))
            self.transactions += 1
            self.most_transactions = max(self.most_transactions, len(self.running))
            self.most_requests = max(self.most_requests, sum(self.running))
            try:
                return await transact(requests)
            finally:
                self.running.remove(len(requests))

        processor._transact = watched  # type: ignore[method-assign]


async def _handed_over(processor: RequestProcessor, watched: Watched, records: int) -> bool:
    """``records`` are in the processor: waiting, or in its (blocked) transactions."""
    return len(processor._group._waiting) + sum(watched.running) == records


async def committed_offset(admin: AIOKafkaAdminClient, settings: Settings) -> int:
    offsets: dict[Any, Any] = await admin.list_consumer_group_offsets(settings.consumer_group)
    return max((o.offset for o in offsets.values()), default=0)


async def test_one_partition_keeps_many_records_in_flight_and_commits_them_in_order(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(
        update={
            "topic_partitions": 1,
            "worker_consumers": 1,
            "worker_batch_max": 32,
            "worker_transactions": 2,
            "worker_max_in_flight": 48,
        }
    )
    await ensure_topics(settings)
    await make_site(engine, settings, capacity=RECORDS, n_accounts=4)
    processor = RequestProcessor(settings, Database(engine))
    watched = Watched(processor)
    wiring = Wiring(settings, asyncio.Event(), "worker")
    admin = AIOKafkaAdminClient(**client_options(settings))
    producer = AIOKafkaProducer(**producer_options(settings))
    await admin.start()
    await producer.start()
    try:
        records = [start(settings, f"job-{n}") for n in range(RECORDS)]
        sent = [
            await producer.send(settings.topic("requests"), r.value, key=r.key, headers=r.headers)
            for r in records
        ]
        await asyncio.gather(*sent)
        subscription = Subscription(settings.topic("requests"), settings.consumer_group, 1)
        seen: list[tuple[int, int]] = []
        blocker = await engine.connect()
        await blocker.begin()  # holds the site: the worker's transactions wait for it
        await blocker.execute(text("SELECT 1 FROM sites WHERE slug = 'board' FOR UPDATE"))
        async with pipelined(wiring, subscription, processor.submit, 48):
            # the bound reached: 48 records handed over, none final, none committed
            await eventually(lambda: _handed_over(processor, watched, 48), timeout=60)
            assert watched.most_transactions == 2
            assert await committed_offset(admin, settings) == 0
            await blocker.rollback()
            await blocker.close()

            async def all_committed() -> bool:
                """Sample the committed offset and, read after it, the inbox rows before it."""
                committed = await committed_offset(admin, settings)
                done = await scalar(
                    engine, "SELECT count(*) FROM inbox WHERE record_offset < :c", c=committed
                )
                seen.append((committed, int(done)))
                return committed >= RECORDS

            await eventually(all_committed, timeout=120, every=0.02)
        processor.close()
        await processor.drain()
    finally:
        await producer.stop()
        await admin.close()
        wiring.stop.set()
        await wiring.close()
    assert all(done == committed for committed, done in seen), seen
    # one partition, one consumer: many records at a time, in side-by-side transactions
    assert 2 < watched.most_requests <= 48  # never more than the bound in flight
    assert watched.transactions < RECORDS / 4
    kinds = [r["type"] for r in await replies(engine, settings)]
    assert len(kinds) == RECORDS and kinds.count("job.granted") == 4
    assert await scalar(engine, "SELECT count(*) FROM inbox WHERE record_partition = 0") == RECORDS


async def test_a_failed_shared_transactions_requests_go_alone_in_each_jobs_order(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    await make_failing_site(engine, settings, "locked")
    knobs = {"worker_batch_max": 32, "worker_transactions": 2, "unexpected_error_attempts": 1}
    processor = RequestProcessor(settings.model_copy(update=knobs), Database(engine))
    assert await processor.process(start(settings, "holder")) == "replied"
    # each waiter's start and then its cancel, with a request that fails the shared transaction
    # among them: every request goes again alone, and a cancel never overtakes its start
    records = []
    for n in range(8):
        records += [start(settings, f"waiter-{n}"), cancel(settings, f"waiter-{n}")]
    records.insert(8, start(settings, "unreadable", site="locked"))
    outcomes = await asyncio.gather(*(processor.process(r) for r in records))
    assert sorted(set(outcomes)) == ["dead_lettered", "replied"]
    assert outcomes.count("dead_lettered") == 1
    assert await scalar(engine, "SELECT count(*) FROM inbox") == 1 + 16
    statuses = await scalar(
        engine, "SELECT array_agg(DISTINCT status::text) FROM jobs WHERE id LIKE 'waiter-%'"
    )
    assert statuses == ["CANCELLED"]
    for n in range(8):
        kinds = [r["type"] for r in await replies(engine, settings, f"waiter-{n}")]
        assert kinds[0] == "job.queued" and kinds[-1] == "job.cancelled", kinds
