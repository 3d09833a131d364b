"""The outbox rows a capture's submit writes leave in one relay round (real PostgreSQL, real
Kafka): the reply, the handoff record and the capture.received event commit together, and one
relay owning every shard reads them in one statement and sends them together."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.outbox.relay import Relay
from app.settings import Settings
from tests.integration.conftest_outbox import outbox_rows
from tests.support.captures import running_job, submit
from workers.requests import RequestProcessor


async def test_the_rows_of_a_capture_submit_leave_in_one_relay_round(
    processor: RequestProcessor, engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    lease = await running_job(processor, engine, settings)
    relay = Relay(settings)
    try:
        await relay.run_once()  # the grant and its events
        assert await outbox_rows(engine) == 0
        assert await processor.process(submit(settings, "job-1", lease, "cap-1")) == "replied"
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT topic, shard FROM outbox ORDER BY id"))
            written = [(topic.removeprefix(settings.topic_prefix), shard) for topic, shard in rows]
        round_ = await relay.run_once()
    finally:
        await relay.close()

    topics_written = sorted(topic for topic, _ in written)
    assert topics_written == ["captures", "events", "replies"]
    # keyed by the job (the reply) and by the capture (the other two): two shards at most
    assert len({shard for _, shard in written}) <= 2
    assert round_.published == 3 and await outbox_rows(engine) == 0
