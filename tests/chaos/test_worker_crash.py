"""Claim workers killed at the worst moments (real processes, SIGKILL): nothing is lost, nothing
is done twice, nothing is half-written."""

from __future__ import annotations

import json
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import producer_options
from app.settings import Settings
from tests.support.kafka import lag_returns_to_zero
from tests.support.leasing import COLLECTOR_PUBLIC_KEY, make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos


async def send_start(settings: Settings, job_id: str) -> str:
    request_id = str(uuid.uuid4())
    body = {
        "type": "job.start", "v": 1, "request_id": request_id, "job_id": job_id,
        "site": "board", "collector": "chaos", "wait_seconds": 60, "public_key": COLLECTOR_PUBLIC_KEY,
    }  # fmt: skip
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("requests"), json.dumps(body).encode(), key=job_id.encode(),
            headers=[("correlation_id", request_id.encode())],
        )  # fmt: skip
    finally:
        await producer.stop()
    return request_id


async def granted_replies(engine: AsyncEngine, settings: Settings, job_id: str) -> int:
    return int(
        await scalar(
            engine,
            "SELECT count(*) FROM outbox WHERE topic = :t AND convert_from(payload, 'UTF8')::jsonb"
            " @> jsonb_build_object('type', 'job.granted', 'job_id', CAST(:j AS text))",
            t=settings.topic("replies"),
            j=job_id,
        )
    )


async def test_a_worker_killed_after_commit_before_its_offset_commit_does_not_grant_twice(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=2, n_accounts=2)
    await send_start(settings, "victim")
    with QmProcess(settings, "worker", fault_point="after_commit", fault_job_id="victim") as doomed:
        assert doomed.wait(60) == -9, doomed.output()[-4000:]  # committed, died before the ack
    assert await granted_replies(engine, settings, "victim") == 1
    with QmProcess(settings, "worker"):
        # the very record, read again, is known by its position: not granted again, and its
        # reply (committed with the grant) is not sent a second time
        await lag_returns_to_zero(settings)
    assert await scalar(engine, "SELECT count(*) FROM inbox") == 1
    assert await granted_replies(engine, settings, "victim") == 1
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE status = 'USING'") == 1
    assert await scalar(engine, "SELECT running FROM sites") == 1


async def test_a_worker_killed_mid_transaction_leaves_nothing_half_written(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings)
    await send_start(settings, "victim")
    with QmProcess(
        settings, "worker", fault_point="mid_transaction", fault_job_id="victim"
    ) as doomed:
        assert doomed.wait(60) == -9, doomed.output()[-4000:]
    for table in ("jobs", "inbox", "outbox", "job_grants"):
        assert await scalar(engine, f"SELECT count(*) FROM {table}") == 0, table
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
    with QmProcess(settings, "worker"):
        await eventually(
            lambda: _equals(granted_replies(engine, settings, "victim"), 1), timeout=60
        )
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1


async def _equals(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]
