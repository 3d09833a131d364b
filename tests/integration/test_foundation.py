"""The ground everything stands on: a real broker, a real database, migrations both ways."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.migrate import alembic_config, downgrade, upgrade
from app.kafka import client_options, producer_options
from app.settings import Settings
from schemas.states import AccountStatus, CaptureStatus, JobStatus, ProxyStatus, SeedStatus
from tests.conftest import asyncpg_dsn
from tests.support.databases import empty_database


async def test_message_round_trips_through_the_real_broker_with_a_consumer_group(
    topics: Settings,
) -> None:
    settings = topics
    topic = settings.topic("requests")
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"hello": 1}', key=b"job-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **client_options(settings),
        group_id=f"{settings.topic_prefix}smoke",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"job-1", b'{"hello": 1}')


@pytest.mark.parametrize(
    ("pg_type", "enum"),
    [
        ("account_status", AccountStatus),
        ("seed_status", SeedStatus),
        ("job_status", JobStatus),
        ("capture_status", CaptureStatus),
        ("proxy_status", ProxyStatus),
    ],
)
async def test_database_enums_equal_the_python_enums(
    engine: AsyncEngine, pg_type: str, enum: type
) -> None:
    async with engine.connect() as conn:
        labels = (await conn.execute(text(f"SELECT enum_range(NULL::{pg_type})::text[]"))).scalar()
    assert labels == [member.value for member in enum]


async def test_migrations_apply_and_downgrade_on_the_real_database(
    postgres_admin_url: str,
) -> None:
    async with empty_database(postgres_admin_url) as url:
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        await conn.close()
        assert {"sites", "accounts", "sessions", "seeds", "jobs", "captures", "inbox", "outbox",
                "domain_rewrites"} <= tables  # fmt: skip
        await asyncio.to_thread(downgrade, url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        left = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        await conn.close()
        assert left == {"alembic_version"}


async def test_a_running_job_without_a_lease_is_refused_by_the_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO sites (slug, host, capacity) VALUES ('s', 'e.com', 1)")
        )
    with pytest.raises(Exception, match="check constraint"):
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO jobs (id, site, collector, status, lease_seconds, request_id,"
                    " reply_to, correlation_id) VALUES ('j', 's', 'c', 'RUNNING', 60,"
                    " gen_random_uuid(), 'r', 'c')"
                )
            )


async def test_webhooks_set_before_sealing_are_sealed_by_the_migration_and_opened_by_its_downgrade(
    postgres_admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(postgres_admin_url))
    [sealing] = [r for r in script.walk_revisions() if r.path.endswith("_sealed_webhooks.py")]
    before = sealing.down_revision
    assert isinstance(before, str)
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("QM_SECRET_KEYS", key)
    hook = "https://hooks.example/captures/T0KEN?key=S3CRET"
    async with empty_database(postgres_admin_url) as url:
        await asyncio.to_thread(upgrade, url, before)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(
                "INSERT INTO sites (slug, host, capacity, webhook_url) VALUES ('board', 'b', 1, $1)",
                hook,
            )
            await asyncio.to_thread(upgrade, url, sealing.revision)
            row = await conn.fetchrow("SELECT webhook_shown, webhook_sealed FROM sites")
            assert row["webhook_shown"] == "https://hooks.example/…"
            assert Fernet(key).decrypt(row["webhook_sealed"]).decode() == hook
            assert (
                await conn.fetchval("SELECT count(*) FROM sites WHERE sites::text LIKE '%T0KEN%'")
                == 0
            )
            await asyncio.to_thread(downgrade, url, before)
            assert await conn.fetchval("SELECT webhook_url FROM sites") == hook
        finally:
            await conn.close()
