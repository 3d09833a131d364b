"""The claim worker (being built): consumes qm.requests and answers through the outbox."""

from __future__ import annotations

import asyncio

from app.settings import Settings


async def run_claim_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Run the claim worker until ``stop`` is set."""
    await stop.wait()
