"""Claim workers leaving while many records are in flight. Killed (SIGKILL): the records are read
again by the restarted worker, and every request is answered exactly once, transitioned once, and
has one inbox row. Stopped (SIGTERM): the records in flight finish and are committed before its
partitions move, so the worker that takes them over reads none of them again."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options, ensure_topics, producer_options, topic_partitions
from app.settings import Settings
from tests.support.kafka import lag_returns_to_zero
from tests.support.leasing import make_site, scalar, start
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

REQUESTS = 300
VICTIM = "job-150"


async def test_a_worker_killed_with_records_in_flight_answers_every_request_exactly_once(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(update={"topic_partitions": 2})
    await ensure_topics(settings)
    await make_site(engine, settings, capacity=REQUESTS, n_accounts=8)
    request_ids = await send_starts(settings)
    knobs = {"worker_consumers": 1, "worker_batch_max": 32, "worker_transactions": 2}
    with QmProcess(settings, "relay"):
        # a backlog to read: the worker dies right after the transaction carrying the victim's
        # start commits, with the records around it in flight
        with QmProcess(
            settings, "worker", fault_point="after_commit", fault_job_id=VICTIM, **knobs
        ) as doomed:
            assert doomed.wait(90) == -9, doomed.output()[-4000:]
        answered = int(await scalar(engine, "SELECT count(*) FROM inbox"))
        assert 0 < answered < REQUESTS
        # the victim's transaction carried several records of one partition at once
        together = await scalar(
            engine,
            "SELECT max(n) FROM (SELECT count(*) AS n FROM inbox WHERE xmin = (SELECT xmin FROM"
            " inbox JOIN jobs ON jobs.id = inbox.job_id WHERE jobs.id = :victim)"
            " GROUP BY record_partition) AS per_partition",
            victim=VICTIM,
        )
        assert together > 1
        # records whose transaction committed but whose offsets did not: read again below
        assert await committed_offsets(settings) < answered
        with QmProcess(settings, "worker", **knobs):
            await lag_returns_to_zero(settings, timeout=120)
            await eventually(lambda: _outbox_empty(engine), timeout=60)
    assert await scalar(engine, "SELECT count(*) FROM inbox") == REQUESTS
    assert await scalar(engine, "SELECT count(*) FROM jobs") == REQUESTS
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 8
    replies = await correlation_ids_on(settings, settings.topic("replies"))
    assert set(replies) == set(request_ids)
    assert [cid for cid, n in replies.items() if n != 1] == []


async def test_a_worker_stopped_mid_load_hands_its_partitions_over_with_nothing_read_again(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(update={"topic_partitions": 2})
    await ensure_topics(settings)
    await make_site(engine, settings, capacity=2 * REQUESTS, n_accounts=8)
    knobs = {"worker_consumers": 1, "worker_batch_max": 32, "worker_transactions": 2}
    leaving, staying = (QmProcess(settings, "worker", **knobs) for _ in range(2))
    with QmProcess(settings, "relay"), leaving, staying:
        first = await send_starts(settings)
        await eventually(lambda: _answered(engine, REQUESTS // 3), timeout=60)
        more = asyncio.create_task(send_starts(settings, first=REQUESTS))  # load goes on
        assert await scalar(engine, "SELECT count(*) FROM inbox") < REQUESTS
        assert await asyncio.to_thread(leaving.stop) == 0, leaving.output()[-4000:]
        request_ids = first + await more
        await lag_returns_to_zero(settings, timeout=120)
        await eventually(lambda: _outbox_empty(engine), timeout=60)
        assert "request_redelivered" not in leaving.output() + staying.output()
    assert await scalar(engine, "SELECT count(*) FROM inbox") == 2 * REQUESTS
    replies = await correlation_ids_on(settings, settings.topic("replies"))
    assert set(replies) == set(request_ids)
    assert [cid for cid, n in replies.items() if n != 1] == []


async def send_starts(settings: Settings, first: int = 0) -> list[str]:
    """``REQUESTS`` job starts (jobs ``job-<first>`` on); their correlation ids."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        records = [start(settings, f"job-{n}") for n in range(first, first + REQUESTS)]
        sent = [
            await producer.send(settings.topic("requests"), r.value, key=r.key, headers=r.headers)
            for r in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return [dict(r.headers)["correlation_id"].decode() for r in records]


async def committed_offsets(settings: Settings) -> int:
    """The claim workers' committed offsets, summed over the partitions."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.consumer_group)
    finally:
        await admin.close()
    return sum(max(o.offset, 0) for o in offsets.values())


async def correlation_ids_on(settings: Settings, topic: str) -> Counter[str]:
    """How many records of ``topic`` carry each correlation id (read to its end)."""
    consumer = AIOKafkaConsumer(**client_options(settings), auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(topic_partitions(settings)[topic])]
        consumer.assign(partitions)
        end = await consumer.end_offsets(partitions)
        seen: Counter[str] = Counter()
        async with asyncio.timeout(60):
            while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        cid = dict(record.headers).get("correlation_id", b"").decode()
                        seen[cid] += 1
        return seen
    finally:
        await consumer.stop()


async def _answered(engine: AsyncEngine, at_least: int) -> bool:
    return int(await scalar(engine, "SELECT count(*) FROM inbox")) >= at_least


async def _outbox_empty(engine: AsyncEngine) -> bool:
    return await scalar(engine, "SELECT count(*) FROM outbox") == 0
