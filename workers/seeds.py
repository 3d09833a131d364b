"""The seeds family: seeds.claim, more seeds for a live lease (the job's own site, due ones only)."""

from __future__ import annotations

from typing import Any

from app import seeding
from app.lease_secrets import lease_secret_hash
from app.leasing import Tx
from schemas.messages import SeedsClaim, SeedsClaimed
from workers.jobs import refuse_follow_up


async def claim(tx: Tx, req: SeedsClaim, reply_to: str, correlation_id: str) -> dict[str, Any]:
    """Hand the live lease up to ``limit`` due seeds (none due: an empty ``seeds.claimed``); a
    stale token, a wrong secret or a lapsed lease gets ``job.lease_lost`` and nothing changes."""
    granted = await seeding.hand_out(
        tx,
        job_id=req.job_id,
        lease_token=req.lease_token,
        secret_hash=lease_secret_hash(req.lease_secret),
        limit=req.limit,
    )
    if granted is None:
        return await refuse_follow_up(tx, req, "seeds_claim_refused")
    return SeedsClaimed(request_id=req.request_id, job_id=req.job_id, seeds=granted).model_dump(
        mode="json"
    )
