"""`qm reaper`: runs every sweep on its interval. Safe in every replica at once: each repair is a
conditional update that repeats its staleness test, so a second reaper's attempt changes nothing.

After each round it also refreshes the per-site gauges (running, waiting, accounts by status)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from app.crypto import SecretBox
from app.errors import Disposition, classify
from app.health import SWEEP_CHANGES, set_site_gauges
from app.settings import Settings
from app.store import Database
from app.store.sites import site_load
from reapers.base import Sweep
from reapers.block_cooldowns import BlockCooldowns
from reapers.capacity_back import CapacityBack
from reapers.expired_leases import ExpiredLeases
from reapers.inbox_retention import InboxRetention
from reapers.job_retention import JobRetention
from reapers.lapsed_handoffs import LapsedHandoffs
from reapers.overdue_waits import OverdueWaits
from reapers.undispatched_captures import UndispatchedCaptures

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()


def job_sweeps(settings: Settings, db: Database, secrets: SecretBox) -> list[Sweep]:
    """The job reaper's sweeps, in the order one round runs them."""
    return [
        ExpiredLeases(settings, db, secrets),
        OverdueWaits(settings, db, secrets),
        BlockCooldowns(settings, db, secrets),
        CapacityBack(settings, db, secrets),
        InboxRetention(settings, db, secrets),
        JobRetention(settings, db, secrets),
    ]


def capture_sweeps(settings: Settings, db: Database, secrets: SecretBox) -> list[Sweep]:
    """The capture reaper's sweeps: lapsed handoffs first, so their records go out at once."""
    return [LapsedHandoffs(settings, db, secrets), UndispatchedCaptures(settings, db, secrets)]


async def run_round(sweeps: list[Sweep]) -> None:
    """One round: every sweep once; a failing sweep is logged and the others still run."""
    for sweep in sweeps:
        try:
            result = await sweep.run_once()
        except Exception as exc:
            if classify(exc) is not Disposition.TRANSIENT:
                log.exception("sweep_failed", sweep=sweep.name)
            else:
                log.warning(
                    "sweep_transient_error", sweep=sweep.name, error_class=type(exc).__name__
                )
            continue
        if result.changed:
            SWEEP_CHANGES.labels(sweep.name).inc(len(result.changed))
        if result.changed or result.failed:  # failed rows were counted and logged one by one
            log.info(
                "sweep_done",
                sweep=sweep.name,
                changed=len(result.changed),
                failed=len(result.failed),
            )


async def refresh_site_gauges(db: Database) -> None:
    """Set the per-site gauges from the database (a failure leaves the last values)."""
    try:
        async with db.transaction() as conn:
            set_site_gauges(await site_load(conn))
    except Exception as exc:  # noqa: BLE001 - gauges wait for the next round
        log.warning("site_gauges_failed", error_class=type(exc).__name__)


async def run_reapers(wiring: Wiring) -> None:
    """Run one round of every sweep each ``reaper_interval_seconds`` until ``wiring.stop`` is set."""
    settings, stop = wiring.settings, wiring.stop
    db = wiring.database(pool_size=2)
    secrets = wiring.secrets  # one box for every sweep of the process
    sweeps = job_sweeps(settings, db, secrets) + capture_sweeps(settings, db, secrets)
    log.info(
        "reaper_started", sweeps=[s.name for s in sweeps], interval=settings.reaper_interval_seconds
    )
    while not stop.is_set():
        await run_round(sweeps)
        await refresh_site_gauges(db)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.reaper_interval_seconds)
    log.info("reaper_stopped")
