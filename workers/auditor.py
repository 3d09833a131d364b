"""The auditor process: follows every partition of ``qm.events`` from its end with the checker
of `qm audit leases` (``app.audit.live``) and posts the first violation of each kind to Slack."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.alerts.slack import Notifier
from app.audit.facts import Position
from app.audit.live import LiveAudit
from app.audit.sources import consumer, partitions

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()

FETCH_WAIT_MS = 500
BATCH_RECORDS = 2000


async def run_auditor(wiring: Wiring) -> None:
    """Run the auditor until ``wiring.stop`` is set. It joins no consumer group: one account's
    leases travel on several partitions, so every replica reads them all."""
    settings, stop = wiring.settings, wiring.stop
    url = settings.slack_webhook_url
    notifier = Notifier(url.get_secret_value() if url else None)
    audit = LiveAudit(
        reorder_seconds=settings.audit_reorder_seconds,
        grace_seconds=settings.audit_grace_seconds,
    )
    topic = settings.topic("events")
    wiring.needs_kafka()
    async with consumer(settings) as client:
        tps = [TopicPartition(topic, p) for p in sorted(await partitions(settings, topic))]
        client.assign(tps)
        await client.seek_to_end(*tps)
        assigned = bool(tps)

        async def following() -> bool:
            return assigned

        wiring.health.check("events_assigned", following)
        log.info("auditor_started", topic=topic, partitions=len(tps))
        while not stop.is_set():
            batches = await client.getmany(timeout_ms=FETCH_WAIT_MS, max_records=BATCH_RECORDS)
            for records in batches.values():
                for record in records:
                    position = Position(record.topic, record.partition, record.offset)
                    audit.checker.feed(position, record.value)
            audit.tick(time.time(), caught_up=await _caught_up(client, tps))
            for post in audit.take_posts():
                await notifier.send(post)
    log.info("auditor_stopped")


async def _caught_up(client: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    """Whether every partition was read to the end the broker last reported."""
    for tp in tps:
        end = client.highwater(tp)
        if end is None or await client.position(tp) < end:
            return False
    return True
