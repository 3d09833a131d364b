"""Job retention: jobs finished more than ``QM_JOB_RETENTION_SECONDS`` ago are deleted, with their
grants and delivered captures, and seed holds that ended as long ago, so ``jobs``, ``job_grants``,
``captures`` and ``seed_assignments`` stop growing with history.

Batches of ``QM_JOB_PRUNE_BATCH`` jobs (or seeds' holds), one short transaction each, so pruning
never holds many locks or one long transaction; at most ``MAX_BATCHES`` batches of jobs and
``HOLD_PAGES`` of seeds a sweep, so a large backlog is drained over several rounds and never holds
back the round's other sweeps. A job whose
captures are not all delivered is kept.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.store import retention
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()

MAX_BATCHES = 100  # batches of jobs (or inbox rows) one sweep deletes at most
# pages of seeds whose ended holds one sweep prunes: every page is read whether or not it has
# holds to delete, so a round reads a few, and a pass over a million seeds takes some minutes
HOLD_PAGES = 10


class JobRetention(Sweep):
    name = "job_retention"
    max_batches = MAX_BATCHES
    hold_pages = HOLD_PAGES
    seed_cursor = 0  # the last seed whose holds were pruned; the next sweep goes on from there

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        result = SweepResult(self.name)
        batch = self.settings.job_prune_batch
        for _ in range(self.max_batches):
            async with self.db.transaction() as conn:
                pruned = await retention.prune_finished_jobs(
                    conn, keep_seconds=self.settings.job_retention_seconds, limit=batch, now=now
                )
            result.changed.extend(pruned)
            if len(pruned) < batch:
                break
        holds = await self._prune_seed_holds(now)
        if result.changed or holds:
            log.info("jobs_pruned", jobs=len(result.changed), seed_holds=holds)
        return result

    async def _prune_seed_holds(self, now: datetime | None) -> int:
        """Ended seed holds past retention, a page of seeds a transaction, from where the last
        sweep stopped (back to the first seed once past the last); how many went."""
        deleted = 0
        for _ in range(self.hold_pages):
            async with self.db.transaction() as conn:
                last, gone = await retention.prune_seed_holds(
                    conn,
                    keep_seconds=self.settings.job_retention_seconds,
                    after=self.seed_cursor,
                    limit=self.settings.job_prune_batch,
                    now=now,
                )
            deleted += gone
            self.seed_cursor = last or 0
            if last is None:
                break
        return deleted
