"""Leasing end to end: collectors through the SDK, the real `qm` processes, real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options, sdk_client
from app.sdk import RequestTimeout
from app.settings import Settings
from tests.support.leasing import CANARY, make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

COLLECTORS = 50


async def grant_history(engine: AsyncEngine) -> list[dict]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT g.lease_token, g.job_id, g.account_id, g.granted_at, g.ended_at, j.queue_seq"
                " FROM job_grants g JOIN jobs j ON j.id = g.job_id ORDER BY g.lease_token"
            )
        )
        return [dict(r._mapping) for r in rows]


async def test_fifty_collectors_never_share_an_account_nor_exceed_capacity_and_all_finish(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=4, n_accounts=5, lease_seconds=60)
    rng = random.Random(7)
    secrets_seen: set[str] = set()

    async def collector(n: int) -> str:
        async with (
            sdk_client(settings, collector=f"collector-{n}") as client,
            client.job(site="board", wait_seconds=120, timeout=30) as job,
        ):
            assert job.account is not None
            secrets_seen.add(job.account.secret.get_secret_value())
            await asyncio.sleep(rng.uniform(0.01, 0.1))  # the crawl
            return job.job_id

    with QmProcess(settings, "all") as server:
        job_ids = await asyncio.wait_for(
            asyncio.gather(*(collector(n) for n in range(COLLECTORS))), 240
        )
        assert server.proc is not None and server.proc.poll() is None
        assert CANARY not in server.output()
    assert len(set(job_ids)) == COLLECTORS
    assert secrets_seen <= {f"{CANARY}-{n}" for n in range(5)}
    assert (
        await scalar(engine, "SELECT count(*) FROM jobs WHERE status = 'SUCCEEDED'") == COLLECTORS
    )

    history = await grant_history(engine)
    assert len(history) == COLLECTORS and all(g["ended_at"] is not None for g in history)
    # never two holders of one account at once
    by_account: dict[int, list[dict]] = defaultdict(list)
    for grant in history:
        by_account[grant["account_id"]].append(grant)
    for grants in by_account.values():
        grants.sort(key=lambda g: g["granted_at"])
        for before, after in itertools.pairwise(grants):
            assert before["ended_at"] <= after["granted_at"]
    # never more than 4 running at once
    edges = sorted([(g["granted_at"], 1) for g in history] + [(g["ended_at"], -1) for g in history])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= 4
    # grants in FIFO order of waiting: lease tokens rise with queue position
    assert [g["queue_seq"] for g in history] == sorted(g["queue_seq"] for g in history)
    assert await scalar(engine, "SELECT running FROM sites") == 0


def same_partition_job_id(job_id: str, partitions: int, prefix: str) -> str:
    """Another job id whose requests land in ``job_id``'s partition (so their order is fixed)."""
    target = (murmur2(job_id.encode()) & 0x7FFFFFFF) % partitions
    return next(
        f"{prefix}-{n}"
        for n in range(10_000)
        if (murmur2(f"{prefix}-{n}".encode()) & 0x7FFFFFFF) % partitions == target
    )


async def test_a_grant_arriving_after_the_collector_gave_up_is_released_to_the_next_waiter(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=1, n_accounts=1, lease_seconds=60)
    late = "late-collector"
    waiter = same_partition_job_id(late, settings.topic_partitions, "waiter")
    with QmProcess(settings, "relay"):
        async with sdk_client(settings) as client:
            # no claim worker yet: the start of `late` waits in Kafka while its collector gives up
            give_up = asyncio.create_task(
                client.job(site="board", job_id=late, timeout=3).__aenter__()
            )
            await eventually(lambda: requests_on_kafka(settings), timeout=10)  # its start is sent
            waiting = asyncio.create_task(
                client.job(site="board", job_id=waiter, wait_seconds=120, timeout=60).__aenter__()
            )
            with pytest.raises(RequestTimeout):
                await give_up
            with QmProcess(settings, "worker"):
                job = await asyncio.wait_for(waiting, 90)
                assert job.account is not None
                await job.__aexit__(None, None, None)
    assert (
        await scalar(engine, "SELECT status::text FROM jobs WHERE id = :id", id=late) == "CANCELLED"
    )
    assert (
        await scalar(engine, "SELECT status::text FROM jobs WHERE id = :id", id=waiter)
        == "SUCCEEDED"
    )
    history = await grant_history(engine)
    assert [g["job_id"] for g in history] == [
        late,
        waiter,
    ]  # the late grant happened, then was released
    assert history[0]["ended_at"] <= history[1]["granted_at"]


async def requests_on_kafka(settings: Settings) -> int:
    """How many requests the requests topic holds."""
    consumer = AIOKafkaConsumer(**client_options(settings))
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings.topic("requests"), p) for p in range(settings.topic_partitions)
        ]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()
