"""`qm reaper`: runs every sweep on its interval. Safe in every replica at once: each repair is a
conditional update that repeats its staleness test, so a second reaper's attempt changes nothing."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from app.errors import Disposition, classify
from app.health import SWEEP_CHANGES
from app.settings import Settings
from app.store import Database
from reapers.base import Sweep
from reapers.capacity_back import CapacityBack
from reapers.expired_leases import ExpiredLeases
from reapers.lapsed_handoffs import LapsedHandoffs
from reapers.overdue_waits import OverdueWaits
from reapers.undispatched_captures import UndispatchedCaptures

log = structlog.get_logger()


def job_sweeps(settings: Settings, db: Database) -> list[Sweep]:
    """The job reaper's sweeps, in the order one round runs them."""
    return [ExpiredLeases(settings, db), OverdueWaits(settings, db), CapacityBack(settings, db)]


def capture_sweeps(settings: Settings, db: Database) -> list[Sweep]:
    """The capture reaper's sweeps: lapsed handoffs first, so their records go out at once."""
    return [LapsedHandoffs(settings, db), UndispatchedCaptures(settings, db)]


async def run_reapers(settings: Settings, stop: asyncio.Event) -> None:
    """Run one round of every sweep each ``reaper_interval_seconds`` until ``stop`` is set."""
    db = Database.from_settings(settings, pool_size=2)
    sweeps = job_sweeps(settings, db) + capture_sweeps(settings, db)
    log.info(
        "reaper_started", sweeps=[s.name for s in sweeps], interval=settings.reaper_interval_seconds
    )
    try:
        while not stop.is_set():
            for sweep in sweeps:
                try:
                    result = await sweep.run_once()
                except Exception as exc:
                    if classify(exc) is not Disposition.TRANSIENT:
                        log.exception("sweep_failed", sweep=sweep.name)
                    else:
                        log.warning(
                            "sweep_transient_error",
                            sweep=sweep.name,
                            error_class=type(exc).__name__,
                        )
                    continue
                if result.changed:
                    SWEEP_CHANGES.labels(sweep.name).inc(len(result.changed))
                    log.info("sweep_done", sweep=sweep.name, changed=len(result.changed))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.reaper_interval_seconds)
    finally:
        await db.close()
        log.info("reaper_stopped")
