"""Block cooldowns: a BLOCKED account whose block had a cooldown returns to ACTIVE when it ends.

The cooldown comes from the collector (``cooldown_seconds`` on ``job.finish`` blocked) or the
site's ``block_cooldown_seconds``; a block without one (an operator's, or a cooldown of 0)
stays until an operator unblocks it. The account goes to the site's oldest waiter in the same
transaction. Recovery bound: the cooldown + one sweep interval.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.core import leases
from app.core.transaction import Tx
from app.store import Row, accounts
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class BlockCooldowns(Sweep):
    name = "block_cooldowns"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        limit = self.settings.reaper_page_size
        return await self.reap_pages(
            lambda conn, after: accounts.find_ended_blocks(conn, now=now, after=after, limit=limit),
            lambda stale: self._end(stale, now),
            after=0,  # account ids are integers
        )

    async def _end(self, stale: Row, now: datetime | None) -> bool:
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            ended = await leases.end_block(tx, stale, now)
            if ended is None:
                log.info("reap_lost_race", account_id=stale["id"], lease_token=stale["lease_token"])
                return False
            account, granted = ended
            await tx.flush()
        log.info("block_ended", account_id=account["id"], site=account["site"], granted=granted)
        return True
