"""A request that failed on a bug is dead-lettered; after the fix, `qm dlt replay` gets it processed once."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import producer_options
from app.settings import Settings
from tests.support.kafka import lag_returns_to_zero
from tests.support.leasing import COLLECTOR_PUBLIC_KEY, make_site, scalar
from tests.support.processes import QmProcess, settings_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos


async def qm(settings: Settings, *args: str) -> str:
    """Run `qm …` as an operator would; return its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, env={**settings_env(settings), "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    return output.decode()


async def test_a_dead_lettered_request_replayed_after_the_fix_is_processed_once(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings)
    request_id = str(uuid.uuid4())
    body = {"type": "job.start", "v": 1, "request_id": request_id, "job_id": "unlucky", "site": "board",
            "collector": "c", "wait_seconds": 30, "public_key": COLLECTOR_PUBLIC_KEY}  # fmt: skip
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("requests"), json.dumps(body).encode(), key=b"unlucky"
        )
    finally:
        await producer.stop()
    dead_letters = "SELECT count(*) FROM outbox WHERE topic = :t"
    # the bug: the database refuses to queue the job (an error no retry mends)
    await _execute(engine, BUG)
    with QmProcess(settings, "worker"):
        await eventually(
            lambda: scalar(engine, dead_letters, t=settings.topic("requests.dlt")), timeout=60
        )
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0  # nothing half-done
    with QmProcess(settings, "relay"):
        await eventually(lambda: _outbox_empty(engine), timeout=30)
        listing = await qm(settings, "dlt", "show", "requests.dlt")
        assert "RaiseError" in listing and "unlucky" in listing
        # the fix is deployed; the operator replays
        await _execute(engine, "DROP TRIGGER the_bug ON jobs")
        with QmProcess(settings, "worker"):
            assert "1 replayed" in await qm(settings, "dlt", "replay", "requests.dlt")
            await eventually(lambda: scalar(engine, "SELECT count(*) FROM job_grants"), timeout=60)
            # a second run replays nothing twice
            assert "0 replayed" in await qm(settings, "dlt", "replay", "requests.dlt")
            # even a forced replay is harmless: requests are idempotent by request_id
            assert "1 replayed" in await qm(settings, "dlt", "replay", "requests.dlt", "--again")
            await lag_returns_to_zero(settings)
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1
    assert await scalar(engine, "SELECT status::text FROM jobs") == "RUNNING"


BUG = (
    "CREATE FUNCTION the_bug() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'a bug'; END $$",
    "CREATE TRIGGER the_bug BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION the_bug()",
)


async def _execute(engine: AsyncEngine, statements: str | tuple[str, ...]) -> None:
    async with engine.begin() as conn:
        for statement in (statements,) if isinstance(statements, str) else statements:
            await conn.execute(text(statement))


async def _outbox_empty(engine: AsyncEngine) -> bool:
    return await scalar(engine, "SELECT count(*) FROM outbox") == 0
