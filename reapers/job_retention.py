"""Job retention: jobs finished more than ``QM_JOB_RETENTION_SECONDS`` ago are deleted, with their
grants, so ``jobs`` and ``job_grants`` stop growing with history.

Batches of ``QM_JOB_PRUNE_BATCH`` jobs, one short transaction each, so pruning never holds many
locks or one long transaction. A job a capture refers to is kept.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from app.store import retention
from reapers.base import Sweep, SweepResult

log = structlog.get_logger()


class JobRetention(Sweep):
    name = "job_retention"

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        result = SweepResult(self.name)
        batch = self.settings.job_prune_batch
        while True:
            async with self.db.transaction() as conn:
                pruned = await retention.prune_finished_jobs(
                    conn, keep_seconds=self.settings.job_retention_seconds, limit=batch, now=now
                )
            result.changed.extend(pruned)
            if len(pruned) < batch:
                if result.changed:
                    log.info("jobs_pruned", jobs=len(result.changed))
                return result
