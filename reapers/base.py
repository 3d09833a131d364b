"""What every sweep shares: the database, the services, and a result that says what it did."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from app.crypto import SecretBox
from app.leasing import Services
from app.settings import Settings
from app.store import Conn, Database, Row


@dataclass
class SweepResult:
    """What one ``run_once`` did: the ids it changed, and the ones another actor got to first."""

    sweep: str
    changed: list[str] = field(default_factory=list)
    lost_races: list[str] = field(default_factory=list)


class Sweep:
    """A sweep: ``run_once(now)`` finds stale rows page by page and repairs each with a conditional update."""

    name: ClassVar[str] = "sweep"

    def __init__(self, settings: Settings, db: Database, secrets: SecretBox | None = None) -> None:
        self.settings = settings
        self.db = db
        self.services = Services(settings, secrets or SecretBox.from_settings(settings))

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        raise NotImplementedError

    async def reap_pages(
        self,
        find: Callable[[Conn, Any], Awaitable[list[Row]]],
        reap: Callable[[Row], Awaitable[bool]],
        *,
        after: Any = "",
    ) -> SweepResult:
        """Page through ``find(conn, after)`` (ordered by id, ``reaper_page_size`` at most) and
        ``reap`` each stale row in its own transaction; ``reap`` says whether it changed the row or
        another actor got there first."""
        result = SweepResult(self.name)
        while True:
            async with self.db.transaction() as conn:
                page = await find(conn, after)
            for stale in page:
                reaped = await reap(stale)
                (result.changed if reaped else result.lost_races).append(str(stale["id"]))
            if len(page) < self.settings.reaper_page_size:
                return result
            after = page[-1]["id"]
