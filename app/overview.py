"""What `qm top` and the console's overview read: one snapshot of the database a refresh, and the
dead-letter topics' record counts kept current by a task of their own (a slow broker never stalls
a refresh). Both show the same figures because both read them here."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from app.dlt.reader import DltError, Selection, open_reader
from app.settings import Settings
from app.store import Database, Row, outbox, views

REPAIR_WINDOW_MINUTES = 10
BROKER_REOPEN_SECONDS = 30.0  # a fresh reader sees dead-letter topics created since


@dataclass
class DeadLetters:
    """Records per dead-letter topic, as the broker task last saw them."""

    per_topic: dict[str, int] = field(default_factory=dict)
    error: str | None = "waiting for the broker"


@dataclass(frozen=True)
class Snapshot:
    """What one refresh read from the database."""

    at: datetime
    sites: list[Row]
    backlog: outbox.Backlog
    repairs: Row


async def read_snapshot(db: Database) -> Snapshot:
    """One consistent read of the database for a refresh."""
    async with db.transaction() as conn:
        return Snapshot(
            at=datetime.now(UTC),
            sites=await views.site_overview(conn),
            backlog=await outbox.backlog(conn),
            repairs=await views.reaper_repairs(conn, REPAIR_WINDOW_MINUTES),
        )


async def count_dead_letters(settings: Settings) -> dict[str, int]:
    """Records on each dead-letter topic (end offset minus first offset, over its partitions)."""
    async with open_reader(settings) as reader:
        return {
            topic: (await reader.plan(topic, Selection())).total
            for topic in await reader.dlt_topics()
        }


async def watch_dead_letters(settings: Settings, seen: DeadLetters, interval: float) -> None:
    """Keep ``seen`` current until cancelled; a broker that does not answer is shown, not fatal."""
    while True:
        try:
            async with open_reader(settings) as reader:
                reopen_at = time.monotonic() + BROKER_REOPEN_SECONDS
                while time.monotonic() < reopen_at:
                    topics = await reader.dlt_topics()
                    seen.per_topic = {t: (await reader.plan(t, Selection())).total for t in topics}
                    seen.error = None
                    await asyncio.sleep(interval)
        except DltError as exc:
            seen.error = str(exc)
            await asyncio.sleep(interval)
