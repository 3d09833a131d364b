"""The canary run: a canary password and a canary cookie go through a grant, a session upload, a
finish, forced dead letters and a forced database error, with the real processes, Kafka and
PostgreSQL. Afterwards neither string is found in the clear in any log line of any process, in any
record of any topic (every ``.dlt`` topic included), or in any column of any table. A second, raw
reader of the reply topic learns nothing, while the requesting client opens its own grant."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options, producer_options, sdk_client
from app.settings import Settings
from tests.support.leasing import CANARY, make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

COOKIE = f"canary-cookie-{uuid.uuid4().hex}"


def state(value: str) -> dict[str, Any]:
    return {
        "cookies": [{"name": "sid", "value": value, "domain": "board.example.com", "path": "/"}]
    }


async def all_records(settings: Settings) -> list[tuple[str, bytes]]:
    """Every key, value and header of every record of every topic of this test's prefix, with
    the record's topic."""
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
        **client_options(settings),
    )  # fmt: skip
    producer = AIOKafkaProducer(**producer_options(settings))  # it reads topic metadata
    await consumer.start()
    await producer.start()
    try:
        topics = sorted(t for t in await consumer.topics() if t.startswith(settings.topic_prefix))
        partitions = []
        for topic in topics:
            partitions += [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen: list[tuple[str, bytes]] = []
        async with asyncio.timeout(60):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        parts = [r.key or b"", r.value or b""]
                        parts += [name.encode() + (value or b"") for name, value in r.headers]
                        seen += [(r.topic, part) for part in parts]
        assert any(t.endswith(".dlt") for t in topics), topics
        return seen
    finally:
        await consumer.stop()
        await producer.stop()


async def every_column(engine: AsyncEngine) -> str:
    """Every row of every table of the test's database, as text."""
    async with engine.connect() as conn:
        tables = await conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        )
        dumped = []
        for (table,) in tables:
            rows = await conn.execute(text(f'SELECT t::text FROM "{table}" t'))
            dumped += [row[0] for row in rows]
    return "\n".join(dumped)


async def send_raw(settings: Settings, body: dict[str, Any]) -> bytes:
    """A request as a collector of the old contract would send it: cookies in the clear. Its
    record on the requests topic is the collector's own doing; the bytes are returned so the
    search can tell it from anything Quartermaster wrote."""
    raw = json.dumps(body).encode()
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("requests"), raw, key=body["job_id"].encode(),
            headers=[("correlation_id", body["request_id"].encode())],
        )  # fmt: skip
    finally:
        await producer.stop()
    return raw


async def test_no_canary_anywhere_in_the_clear(
    topics: Settings, engine: AsyncEngine, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=2, n_accounts=1)
    sent_in_clear: list[bytes] = []
    with QmProcess(settings, "all", unexpected_error_attempts=2) as server:
        async with sdk_client(settings, collector="canary") as client:
            # grant, session upload, finish with a session state
            async with client.job(site="board", wait_seconds=30, timeout=30) as job:
                assert job.account is not None
                assert job.account.secret.get_secret_value() == f"{CANARY}-0"
                assert await job.upload_session(state(COOKIE)) == 1
                job.set_session_state(state(COOKIE + "-2"))
            # the next grant carries the session, sealed; this client opens it
            async with client.job(site="board", wait_seconds=30, timeout=30) as job:
                assert job.session is not None
                assert job.session.state()["cookies"][0]["value"] == COOKIE + "-2"
                held = (job.job_id, job.lease_token)
                lease_secret = job._lease_secret.get_secret_value()  # the live lease's capability
            # forced dead letters: the old contract's cookies in the clear
            for kind, field in (
                ("session.upload", "storage_state"),
                ("job.finish", "session_state"),
            ):
                body = {"type": kind, "v": 1, "request_id": str(uuid.uuid4()), "job_id": held[0],
                        "lease_token": held[1], "lease_secret": lease_secret,
                        field: state(COOKIE)}  # fmt: skip
                if kind == "job.finish":
                    body["outcome"] = "succeeded"
                sent_in_clear.append(await send_raw(settings, body))
            # a forced database error while a session state is written
            async with engine.begin() as conn:
                for statement in FAILING_TRIGGER:
                    await conn.execute(text(statement))
            with pytest.raises(Exception):  # noqa: B017 - any refusal: no reply comes
                async with client.job(site="board", wait_seconds=30, timeout=8) as job:
                    await job.upload_session(state(COOKIE + "-3"))

        async def dead_letters() -> bool:
            unsent = await scalar(engine, "SELECT count(*) FROM outbox")
            return unsent == 0 and server.output().count("request_dead_lettered") >= 3

        await eventually(dead_letters, timeout=60)
        log = server.output()
    requests = settings.topic("requests")
    records = [
        part
        for topic, part in await all_records(settings)
        if not (topic == requests and part in sent_in_clear)  # the collector's own doing
    ]
    tables = await every_column(engine)
    here = capfd.readouterr()
    for canary in (CANARY, COOKIE):
        assert canary not in log
        assert not [r for r in records if canary.encode() in r]
        assert canary not in tables
        assert canary not in here.out + here.err
    # a lease secret travels only on the requests topic, which only Quartermaster reads: its
    # dead letters, the replies, the logs and the tables never hold it in the clear
    assert lease_secret not in log + tables + here.out + here.err
    assert not [
        (topic, part)
        for topic, part in await all_records(settings)
        if topic != requests and lease_secret.encode() in part
    ]


FAILING_TRIGGER = (
    """
    CREATE FUNCTION qm_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'forced failure'; END $$
    """,
    """
    CREATE TRIGGER qm_test_fail BEFORE UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION qm_test_fail()
    """,
)
