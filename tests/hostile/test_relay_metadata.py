"""A broker that stalls metadata (relay started or rebuilt, topics not yet learned): the rows wait,
no try is counted, nothing is dead-lettered or parked, and they publish once the broker answers.

The stall is real: a broker of this test alone, frozen with SIGSTOP. Its port still accepts TCP
connections (the kernel completes them) but nothing answers, as a broker too busy to answer does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import make_engine
from app.devstack.kafka import KafkaBroker
from app.kafka import client_options, ensure_topics
from app.outbox.relay import Relay
from app.outbox.writer import Outbox
from app.settings import Settings
from app.store.outbox import backlog
from tests.integration.conftest_outbox import read_topic
from tests.support.waiting import eventually

MAX_ATTEMPTS = 2
# enough metadata time-outs of the topic for its rows to be dead-lettered and then parked, had
# each one counted a try (MAX_ATTEMPTS on the topic, MAX_ATTEMPTS more on outbox.dlt), and one more
TIMEOUTS_SEEN = 2 * MAX_ATTEMPTS + 1


@pytest.fixture
def own_broker() -> Iterator[KafkaBroker]:
    """A broker of this test alone (it is frozen), refusing unknown topics as production does."""
    with KafkaBroker(heap="384m", auto_create_topics=False) as broker:
        yield broker


@contextmanager
def frozen(broker: KafkaBroker) -> Iterator[None]:
    """The broker process stopped (SIGSTOP) for the block, then let go on (SIGCONT)."""
    assert broker.process is not None
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)


def topic_timeouts() -> float:
    return REGISTRY.get_sample_value("qm_outbox_errors_total", {"kind": "topic"}) or 0.0


async def write(engine: AsyncEngine, settings: Settings, topic: str, numbers: range) -> None:
    box = Outbox(settings.outbox_shards)
    for n in numbers:
        box.add(topic, "k", {"n": n})
    async with engine.begin() as conn:
        await box.flush(conn)


async def rows_as_written(engine: AsyncEngine) -> list[tuple[str, int, bool]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT topic, attempts, parked_at IS NOT NULL FROM outbox ORDER BY id")
        )
        return [(row[0], int(row[1]), bool(row[2])) for row in result]


async def test_a_metadata_stall_never_dead_letters_or_parks_a_good_row(
    own_broker: KafkaBroker, database_url: str, topic_prefix: str
) -> None:
    settings = Settings(
        database_url=database_url,
        kafka_bootstrap_servers=own_broker.bootstrap,
        topic_prefix=topic_prefix,
        outbox_poll_seconds=0.2,
        outbox_max_attempts=MAX_ATTEMPTS,
        transient_retry_max_seconds=1.0,
    )
    await ensure_topics(settings)
    warm, late = settings.topic("events"), settings.topic("late")
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(late, 1, 1)])  # it exists; the relay has not sent to it
    finally:
        await admin.close()
    engine = make_engine(settings, pool_size=2)
    relay, stop = Relay(settings), asyncio.Event()
    running = asyncio.create_task(relay.run(stop))

    async def drained() -> bool:
        async with engine.connect() as conn:
            stats = await backlog(conn)
        return stats.rows == 0 and stats.parked == 0

    try:
        await write(engine, settings, warm, range(1))  # the relay's producer is up and connected
        await eventually(drained, timeout=30)
        with frozen(own_broker):
            before = topic_timeouts()
            await write(engine, settings, late, range(3))

            async def stalled_long_enough() -> bool:
                # each time-out is "no answer", never "no such topic": not one try counted
                assert await rows_as_written(engine) == [(late, 0, False)] * 3
                return topic_timeouts() - before >= TIMEOUTS_SEEN

            await eventually(stalled_long_enough, timeout=90, every=0.2)
        await eventually(drained, timeout=60, every=0.2)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await engine.dispose()

    assert [json.loads(r.value)["n"] for r in await read_topic(settings, late)] == [0, 1, 2]
    assert await read_topic(settings, settings.topic("outbox.dlt")) == []
