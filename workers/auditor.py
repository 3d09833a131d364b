"""The auditor process: follows every partition of ``qm.events`` (those there at its start from
their end, those added later from their beginning) with the checker of `qm audit leases`
(``app.audit.live``) and posts the first violation of each kind to Slack."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.alerts.slack import Notifier
from app.audit.facts import Position
from app.audit.live import LiveAudit
from app.audit.sources import SourceError, consumer, partitions
from app.settings import Settings

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
        followed = Partitions(client, settings, topic)
        await followed.refresh(at_start=True)
        wiring.health.check("events_assigned", followed.following)
        log.info("auditor_started", topic=topic, partitions=len(followed.tps))
        while not stop.is_set():
            batches = await client.getmany(timeout_ms=FETCH_WAIT_MS, max_records=BATCH_RECORDS)
            for records in batches.values():
                for record in records:
                    position = Position(record.topic, record.partition, record.offset)
                    audit.checker.feed(position, record.value)
            audit.tick(time.time(), caught_up=await _caught_up(client, followed.tps))
            for post in audit.take_posts():
                await notifier.send(post)
            if time.monotonic() >= followed.next_look:
                await followed.refresh()
    log.info("auditor_stopped")


class Partitions:
    """The partitions of ``topic`` the auditor follows: those found at start from their end, and
    any added since (looked for every ``QM_AUDIT_PARTITIONS_SECONDS``) from their beginning,
    since every event in a partition added after the start is new."""

    def __init__(self, client: AIOKafkaConsumer, settings: Settings, topic: str) -> None:
        self.client = client
        self.settings = settings
        self.topic = topic
        self.tps: list[TopicPartition] = []
        self.next_look = 0.0

    async def following(self) -> bool:
        return bool(self.tps)

    async def refresh(self, *, at_start: bool = False) -> None:
        """Follow the topic's partitions not followed yet; where the others stand is kept."""
        self.next_look = time.monotonic() + self.settings.audit_partitions_seconds
        try:
            found = await partitions(self.settings, self.topic)
        except SourceError:
            if at_start:
                raise
            log.warning("auditor_partitions_unknown", topic=self.topic)  # looked at again later
            return
        added = [TopicPartition(self.topic, p) for p in sorted(found) if p not in self.numbers]
        if not added:
            return
        # a new assignment forgets every position: keep those of the partitions followed
        standing = {tp: await self.client.position(tp) for tp in self.tps}
        self.tps = sorted([*self.tps, *added], key=lambda tp: tp.partition)
        self.client.assign(self.tps)
        for tp, offset in standing.items():
            self.client.seek(tp, offset)
        if at_start:
            await self.client.seek_to_end(*added)
        else:
            await self.client.seek_to_beginning(*added)
            log.info("auditor_partitions_added", topic=self.topic, partitions=len(added))

    @property
    def numbers(self) -> set[int]:
        return {tp.partition for tp in self.tps}


async def _caught_up(client: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    """Whether every partition was read to the end the broker last reported."""
    for tp in tps:
        end = client.highwater(tp)
        if end is None or await client.position(tp) < end:
            return False
    return True
