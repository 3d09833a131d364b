"""Rows the broker refuses when they arrive: pinned on the one row, which is dead-lettered, while
the rows around it publish (real PostgreSQL, real Kafka)."""

from __future__ import annotations

import json

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options
from app.outbox.relay import Relay
from app.outbox.writer import Outbox
from app.settings import Settings
from tests.integration.conftest_outbox import outbox_rows, read_topic, wait_until


async def small_topic(settings: Settings, name: str, max_bytes: int) -> None:
    """A topic whose broker-side limit is ``max_bytes`` per record batch."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        config = {"max.message.bytes": str(max_bytes)}
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=config)])
    finally:
        await admin.close()


async def test_a_row_the_broker_refuses_is_found_in_its_batch_and_dead_lettered_alone(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics.model_copy(update={"outbox_max_attempts": 2})
    topic = settings.topic("strict")
    await small_topic(settings, topic, 2_000)
    box = Outbox(settings.outbox_shards)
    for n in range(7):  # one key: one shard, one partition, one producer batch
        body = {"n": n, "pad": "x" * (5_000 if n == 3 else 10)}
        box.add(topic, "k", body)
    async with engine.begin() as conn:
        await box.flush(conn)

    relay = Relay(settings)
    rounds = []
    try:

        async def drained() -> bool:
            rounds.append(await relay.run_once())
            return await outbox_rows(engine) == 0

        await wait_until(drained, timeout=60, what="every row published or dead-lettered")
    finally:
        await relay.close()

    published = [json.loads(r.value)["n"] for r in await read_topic(settings, topic)]
    assert published == [0, 1, 2, 4, 5, 6]  # in order, only the refused one missing
    assert sum(r.dead_lettered for r in rounds) == 1
    [letter] = await read_topic(settings, settings.topic("outbox.dlt"))
    headers = dict(letter.headers)
    assert json.loads(letter.value)["n"] == 3
    assert headers["qm.dlt.original_topic"] == topic.encode()
    assert headers["qm.dlt.attempts"] == b"2"
