"""Overdue waits: QUEUED jobs past their wait deadline become TIMED_OUT with job.rejected (timed_out).

Recovery bound: the wait deadline + one sweep interval.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import jobs
from app.core.transaction import Tx
from app.store import Row, job_sweeps
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class OverdueWaits(Sweep):
    name = "overdue_waits"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        limit = self.settings.reaper_page_size
        return await self.reap_pages(
            lambda conn, after: job_sweeps.find_overdue_waiting(
                conn, now=now, after=after, limit=limit
            ),
            lambda stale: self._time_out(stale, now),
        )

    async def _time_out(self, stale: Row, now: datetime | None) -> bool:
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            job = await jobs.time_out_wait(tx, stale, now)
            if job is not None:
                await tx.flush()
        log.info("wait_timed_out" if job else "reap_lost_race", job_id=stale["id"])
        return job is not None
