"""Inbox retention: requests older than ``QM_INBOX_RETENTION_SECONDS`` are forgotten.

The inbox answers a redelivered request with the reply it got; after the retention period a
request with the same ``request_id`` is treated as new (docs/contract.md says what each type then
gets). Batches of ``QM_INBOX_PRUNE_BATCH`` rows, one short transaction each, so pruning never
holds many locks or one long transaction; at most ``MAX_BATCHES`` of them a sweep.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.store import inbox
from reapers.base import Sweep, SweepResult
from reapers.job_retention import MAX_BATCHES

log = structlog.get_logger()


class InboxRetention(Sweep):
    name = "inbox_retention"
    max_batches = MAX_BATCHES

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        result = SweepResult(self.name)
        for _ in range(self.max_batches):  # the rest of a large backlog waits for the next round
            async with self.db.transaction() as conn:
                pruned = await inbox.prune(
                    conn,
                    keep_seconds=self.settings.inbox_retention_seconds,
                    limit=self.settings.inbox_prune_batch,
                    now=now,
                )
            result.changed.extend(pruned)
            if len(pruned) < self.settings.inbox_prune_batch:
                break
        if result.changed:
            log.info("inbox_pruned", requests=len(result.changed))
        return result
