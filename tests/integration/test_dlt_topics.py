"""Dead-letter topics have as many partitions as their source (real Kafka)."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.kafka import DLT_SOURCES, client_options, ensure_topics
from app.settings import Settings
from tests.support.waiting import eventually


async def partitions(settings: Settings, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        described = await admin.describe_topics(names)
        return {entry["topic"]: len(entry["partitions"]) for entry in described}
    finally:
        await admin.close()


async def test_dead_letter_topics_get_their_sources_partitions_and_old_ones_grow(
    settings: Settings,
) -> None:
    old = settings.topic("requests.dlt")  # as an older version made it: one partition
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(old, 1, 1)])
    finally:
        await admin.close()

    created = await ensure_topics(settings)

    assert old not in created
    names = [settings.topic(name) for name in DLT_SOURCES]
    wanted = {settings.topic(name): settings.topic_partitions for name in DLT_SOURCES}
    assert settings.topic_partitions > 1

    async def grown() -> bool:  # the broker's metadata follows the change within moments
        return await partitions(settings, names) == wanted

    await eventually(grown, timeout=30)
