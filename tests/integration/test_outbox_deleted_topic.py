"""Rows for a topic that is gone, on a broker that does not create topics (as production brokers
usually do not): dead-lettered after the bounded tries while the rows behind them publish (real
PostgreSQL, a real broker of this test alone with auto-creation off)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import make_engine
from app.devstack.kafka import KafkaBroker
from app.kafka import client_options, ensure_topics
from app.outbox.relay import Relay
from app.outbox.writer import Outbox
from app.settings import Settings
from app.store.outbox import backlog
from tests.integration.conftest_outbox import read_topic, wait_until

# how long the relay may take to settle every row: the bounded tries with their backoff
DRAIN_SECONDS = 30.0


@pytest.fixture
def strict_broker() -> Iterator[KafkaBroker]:
    """A broker of this test alone that never creates a topic by itself."""
    with KafkaBroker(heap="384m", auto_create_topics=False) as broker:
        yield broker


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    return admin


async def _topic_gone(settings: Settings, topic: str) -> bool:
    admin = await _admin(settings)
    try:
        return topic not in await admin.list_topics()
    finally:
        await admin.close()


async def _write(engine: AsyncEngine, settings: Settings, rows: list[tuple[str, int]]) -> None:
    """Commit ``rows`` (topic, n) in one transaction, all of key ``k``: one shard, in order."""
    box = Outbox(settings.outbox_shards)
    for topic, n in rows:
        box.add(topic, "k", {"n": n})
    async with engine.begin() as conn:
        await box.flush(conn)


async def _drained(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        stats = await backlog(conn)
    gauge = REGISTRY.get_sample_value("qm_outbox_backlog_rows")
    return stats.rows == 0 and stats.parked == 0 and gauge == 0


async def test_rows_for_a_deleted_or_missing_topic_are_dead_lettered_and_rows_behind_them_publish(
    strict_broker: KafkaBroker, database_url: str, topic_prefix: str
) -> None:
    settings = Settings(
        database_url=database_url,
        kafka_bootstrap_servers=strict_broker.bootstrap,
        topic_prefix=topic_prefix,
        outbox_poll_seconds=0.2,
        outbox_max_attempts=2,
        transient_retry_max_seconds=1.0,
    )
    await ensure_topics(settings)
    doomed, good = settings.topic("doomed"), settings.topic("events")
    missing = settings.topic("replies.x")  # a reply topic by its name, never created
    admin = await _admin(settings)
    try:
        await admin.create_topics([NewTopic(doomed, 1, 1)])
    finally:
        await admin.close()
    engine = make_engine(settings, pool_size=4)
    relay, stop = Relay(settings), asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        # the relay publishes to the topic first, so it knows the topic when it goes
        await _write(engine, settings, [(doomed, 0)])
        await wait_until(lambda: _drained(engine), 30, "the first row published")
        admin = await _admin(settings)
        try:
            await admin.delete_topics([doomed])
        finally:
            await admin.close()
        await wait_until(lambda: _topic_gone(settings, doomed), 30, "the topic deleted")

        await _write(engine, settings, [(doomed, 1), (doomed, 2), (missing, 3)])
        await _write(engine, settings, [(good, n) for n in range(4, 9)])
        took = await wait_until(lambda: _drained(engine), DRAIN_SECONDS, "every row settled")
        print(f"settled in {took:.1f}s")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await engine.dispose()

    assert [json.loads(r.value)["n"] for r in await read_topic(settings, good)] == [4, 5, 6, 7, 8]
    # each row is dead-lettered when its own tries run out, so not necessarily in id order
    letters = sorted(
        await read_topic(settings, settings.topic("outbox.dlt")),
        key=lambda letter: int(dict(letter.headers)["qm.dlt.outbox_id"]),
    )
    assert [json.loads(letter.value)["n"] for letter in letters] == [1, 2, 3]
    for letter, topic in zip(letters, [doomed, doomed, missing], strict=True):
        headers = dict(letter.headers)
        assert letter.key == b"k"
        assert headers["qm.dlt.original_topic"] == topic.encode()
        assert headers["qm.dlt.attempts"] == b"2"
        assert headers["qm.dlt.error_class"].endswith(b"UnknownTopicOrPartitionError")
        assert headers["qm.dlt.failed_at"]
