"""Capacity back by time: when cooldowns end or an operator unblocks an account, waiting jobs are
granted within one sweep, FIFO per site (the same grant the claim worker uses)."""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import leases
from app.core.transaction import Tx
from app.store import sites
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class CapacityBack(Sweep):
    name = "capacity_back"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        result = SweepResult(self.name)
        async with self.db.transaction() as conn:
            candidates = await sites.sites_with_waiting_jobs(conn, now)
        for slug in candidates:  # one site's failure is that site's alone
            granted = await self.isolated(result, slug, self._grant(slug, now))
            result.changed.extend(granted or [])
        return result

    async def _grant(self, slug: str, now: datetime | None) -> list[str]:
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            granted = await leases.grant_site(tx, slug, now)
            await tx.flush()
        if granted:
            log.info("waiting_jobs_granted", site=slug, job_ids=granted)
        return granted
