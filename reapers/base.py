"""What every sweep shares: the database, the services, and a result that says what it did."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import structlog

from app.core.transaction import TxServices
from app.crypto import SecretBox
from app.errors import Disposition, classify
from app.health import SWEEP_ROW_FAILURES
from app.settings import Settings
from app.store import Conn, Database, Row

log = structlog.get_logger()

T = TypeVar("T")


@dataclass
class SweepResult:
    """What one ``run_once`` did: the ids it changed, the ones another actor got to first, and
    the ones whose repair raised (rolled back, logged, counted and skipped)."""

    sweep: str
    changed: list[str] = field(default_factory=list)
    lost_races: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Sweep:
    """A sweep: ``run_once(now)`` finds stale rows page by page and repairs each with a conditional update."""

    name: ClassVar[str] = "sweep"

    def __init__(self, settings: Settings, db: Database, secrets: SecretBox | None = None) -> None:
        self.settings = settings
        self.db = db
        self.services = TxServices(settings, secrets or SecretBox.from_settings(settings))

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        raise NotImplementedError

    async def isolated(self, result: SweepResult, id_: Any, repair: Awaitable[T]) -> T | None:
        """Run one row's (or site's) ``repair`` in isolation: when it raises, its transaction
        has rolled back; the row is logged, counted in ``qm_reaper_row_failures_total`` and
        skipped (None), so every other row and site is still swept. A transient failure (the
        database is away) stops the sweep instead: it is no row's fault, the next round retries."""
        try:
            return await repair
        except Exception as exc:
            if classify(exc) is Disposition.TRANSIENT:
                raise
            SWEEP_ROW_FAILURES.labels(self.name).inc()
            log.exception("sweep_row_failed", sweep=self.name, id=str(id_))
            result.failed.append(str(id_))
            return None

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
                reaped = await self.isolated(result, stale["id"], reap(stale))
                if reaped is not None:
                    (result.changed if reaped else result.lost_races).append(str(stale["id"]))
            if len(page) < self.settings.reaper_page_size:
                return result
            after = page[-1]["id"]
