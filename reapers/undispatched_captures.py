"""Undispatched captures: RECEIVED captures whose attempt is due and that have no record in
flight get one on ``qm.captures``: a retry whose backoff is over, or a record that was never
claimed (the seed's "event never published" orphan).

Recovery bound: a retry starts within its backoff + one sweep interval; an unclaimed record is
published again after ``handoff_redispatch_seconds`` + one sweep interval.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import captures as core_captures
from app.core.transaction import Tx
from app.store import Row, captures
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class UndispatchedCaptures(Sweep):
    name = "undispatched_captures"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        limit = self.settings.reaper_page_size
        redispatch = self.settings.handoff_redispatch_seconds
        topic = self.settings.topic("captures")
        return await self.reap_pages(
            lambda conn, after: captures.find_undispatched(
                conn,
                now=now,
                after=after,
                limit=limit,
                redispatch_seconds=redispatch,
                topic=topic,
            ),
            lambda due: self._dispatch(due, now),
        )

    async def _dispatch(self, due: Row, now: datetime | None) -> bool:
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            capture = await core_captures.redispatch(tx, due, now)
            if capture is not None:
                await tx.flush()
        log.info("capture_dispatched" if capture else "reap_lost_race", capture_id=due["id"])
        return capture is not None
