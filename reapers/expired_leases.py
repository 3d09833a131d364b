"""Expired leases: RUNNING jobs whose lease passed become EXPIRED (or FAILED at the attempt cap).

Their account goes back to ACTIVE after the site's cooldown, their capacity slot is handed to the
oldest waiting job in the same transaction, and the holder gets ``job.lease_lost``. Events are
honest about what happens next: an EXPIRED job may be started again, so ``job.expired`` goes to
``qm.events`` only; a job at its attempt cap never runs again, so it gets its terminal
``job.failed`` on ``qm.job-events`` and a dead letter with the ``qm.dlt.*`` headers.
Recovery bound: lease + one sweep interval.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import leases
from app.core.transaction import Tx
from app.store import Row, job_sweeps
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class ExpiredLeases(Sweep):
    name = "expired_leases"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        limit = self.settings.reaper_page_size
        return await self.reap_pages(
            lambda conn, after: job_sweeps.find_expired_leases(
                conn, now=now, after=after, limit=limit
            ),
            lambda stale: self._reap(stale, now),
        )

    async def _reap(self, stale: Row, now: datetime | None) -> bool:
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            job = await leases.expire(tx, stale, f"{self.settings.consumer_group}.reaper", now)
            if job is None:
                log.info("reap_lost_race", job_id=stale["id"], lease_token=stale["lease_token"])
                return False
            await tx.flush()
        log.info(
            "lease_reaped",
            job_id=job["id"],
            lease_token=job["lease_token"],
            status=job["status"],
            reason=job["reason"],
        )
        return True
