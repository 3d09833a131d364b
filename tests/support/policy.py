"""Helpers for the policy tests (use budgets, scopes): a site's budgets, finishes, the answer a
start got."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import sites
from tests.support.leasing import held_lease, replies, request
from workers.requests import RequestProcessor


async def set_budgets(engine: AsyncEngine, **changes: Any) -> None:
    async with engine.begin() as conn:
        assert await sites.update_site(conn, "board", changes) is not None


async def finish(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, job_id: str, **fields: Any
) -> None:
    lease = await held_lease(engine, settings, job_id)
    fields.setdefault("outcome", "succeeded")
    await processor.process(request(settings, "job.finish", job_id, **lease, **fields))


async def answer(engine: AsyncEngine, settings: Settings, job_id: str) -> dict[str, Any]:
    """The latest reply to the job's start request."""
    found = [r for r in await replies(engine, settings, job_id) if r["type"] != "job.finished"]
    assert found, f"{job_id} got no reply"
    return found[-1]
