"""Runs Quartermaster's processes (claim worker, relay, reapers, ...) until a signal stops them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from app.health import serve_metrics
from app.settings import Settings

log = structlog.get_logger()

# A process: a coroutine that runs until ``stop`` is set and then returns cleanly.
Process = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]


def registry() -> dict[str, Process]:
    """Every process `qm run` knows, by name (imported lazily so each stays optional)."""
    from app.outbox.relay import run_relay
    from reapers.runner import run_reapers
    from workers.claim import run_claim_worker
    from workers.handoff import run_handoff_worker

    return {
        "worker": run_claim_worker,
        "relay": run_relay,
        "reaper": run_reapers,
        "handoff": run_handoff_worker,
    }


async def run_processes(settings: Settings, names: list[str]) -> None:
    """Run the named processes together; SIGINT/SIGTERM stop them all, a crash of one stops all."""
    known = registry()
    serve_metrics(settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(known[name](settings, stop), name=name) for name in names]
    log.info("processes_started", processes=names)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    for task in done:
        if task is not stopper and (error := task.exception()) is not None:
            raise error
    log.info("processes_stopped", processes=names)
