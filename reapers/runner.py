"""Runs every sweep on its interval (being built)."""

from __future__ import annotations

import asyncio

from app.settings import Settings


async def run_reapers(settings: Settings, stop: asyncio.Event) -> None:
    """Run the sweeps until ``stop`` is set."""
    await stop.wait()
