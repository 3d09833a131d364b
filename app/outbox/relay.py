"""The outbox relay (being built): publishes committed outbox rows to Kafka in order per key."""

from __future__ import annotations

import asyncio

from app.settings import Settings


async def run_relay(settings: Settings, stop: asyncio.Event) -> None:
    """Run the relay until ``stop`` is set."""
    await stop.wait()
