"""Runs Quartermaster's processes (claim worker, relay, reapers, ...) until a signal stops them.

Each process gets a ``Wiring`` (app.wiring) built from the settings; the health endpoint
(``QM_METRICS_PORT``) reports on all of them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from app.health import HEALTH
from app.settings import Settings
from app.wiring import Wiring

log = structlog.get_logger()

# A process: a coroutine that runs until ``wiring.stop`` is set and then returns cleanly.
Process = Callable[[Wiring], Coroutine[Any, Any, None]]


def registry() -> dict[str, Process]:
    """Every process `qm run` knows, by name (imported lazily so each stays optional)."""
    from app.alerts.watch import run_alerts
    from app.outbox.relay import run_relay
    from reapers.runner import run_reapers
    from workers.claim import run_claim_worker
    from workers.handoff import run_handoff_worker

    return {
        "worker": run_claim_worker,
        "relay": run_relay,
        "reaper": run_reapers,
        "alerts": run_alerts,
        "handoff": run_handoff_worker,
    }


async def _run_one(process: Process, wiring: Wiring) -> None:
    try:
        await process(wiring)
    finally:
        await wiring.close()


async def run_processes(settings: Settings, names: list[str]) -> None:
    """Run the named processes together; SIGINT/SIGTERM stop them all, a crash of one stops all."""
    known = registry()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    wirings = [Wiring(settings, stop, name) for name in names]
    tasks = [asyncio.create_task(_run_one(known[w.process], w), name=w.process) for w in wirings]
    if settings.metrics_port:
        HEALTH.serve(settings.metrics_port, loop)
    watcher = asyncio.create_task(HEALTH.watch(stop), name="health")
    log.info("processes_started", processes=names)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await asyncio.gather(*tasks, watcher, return_exceptions=True)
    stopper.cancel()
    HEALTH.close()
    for task in done:
        if task is not stopper and (error := task.exception()) is not None:
            raise error
    log.info("processes_stopped", processes=names)
