"""Kafka facts for tests: a consumer group's lag."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app.kafka import client_options
from app.settings import Settings


async def lag_returns_to_zero(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until the claim workers' group has committed every request (fail after ``timeout``)."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    consumer = AIOKafkaConsumer(**client_options(settings))
    await admin.start()
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings.topic("requests"), p) for p in range(settings.topic_partitions)
        ]
        end = await consumer.end_offsets(partitions)
        async with asyncio.timeout(timeout):
            while True:
                committed = await admin.list_consumer_group_offsets(settings.consumer_group)
                if all(
                    tp in committed and committed[tp].offset == end[tp]
                    for tp in partitions
                    if end[tp]
                ):
                    return
                await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await admin.close()
