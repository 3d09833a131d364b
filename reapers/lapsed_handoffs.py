"""Lapsed handoffs: HANDING_OFF captures whose claim expired (their handoff worker died) go back to
RECEIVED and are published again at once, or end FAILED with a dead letter at the attempt cap.

The bbox-style reaper of the second stage. Recovery bound: the handoff lease + one sweep interval.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import captures as core_captures
from app.core.transaction import Tx
from app.store import Row, captures
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class LapsedHandoffs(Sweep):
    name = "lapsed_handoffs"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        limit = self.settings.reaper_page_size
        return await self.reap_pages(
            lambda conn, after: captures.find_lapsed_handoffs(
                conn, now=now, after=after, limit=limit
            ),
            lambda stale: self._reap(stale, now),
        )

    async def _reap(self, stale: Row, now: datetime | None) -> bool:
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            capture = await core_captures.reclaim(tx, stale, now)
            if capture is None:  # finalised, or reaped by another replica, since the page
                log.info("reap_lost_race", capture_id=stale["id"])
                return False
            await tx.flush()
        log.info(
            "handoff_reaped",
            capture_id=capture["id"],
            handoff_token=stale["handoff_token"],
            status=capture["status"],
            attempts=capture["attempts"],
        )
        return True
