"""Auditing a test's own qm.events, as `qm audit leases` does, once the relay published all."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.checker import Checker
from app.audit.sources import Window, consumer, topic_records
from app.settings import Settings
from tests.support.leasing import scalar
from tests.support.waiting import eventually


async def audited(settings: Settings, engine: AsyncEngine) -> Checker:
    """The checker after the whole of the test's events topic, once the outbox is empty."""

    async def published() -> bool:
        return await scalar(engine, "SELECT count(*) FROM outbox") == 0

    await eventually(published, timeout=60)
    checker = Checker()
    async with consumer(settings) as client:
        async for position, value in topic_records(
            settings, client, settings.topic("events"), Window()
        ):
            checker.feed(position, value)
    checker.finish()
    return checker
