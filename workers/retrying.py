"""Retrying transient failures in place (``app.errors``: the database or the broker away).

A worker never skips a record for a transient failure: it tries the same step again, waiting
twice as long each time up to a cap, and says it is not ready (``app.health.set_ready``) until
a step succeeds again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from app.errors import Disposition, classify
from app.health import set_ready

log = structlog.get_logger()
T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.05


class TransientRetry:
    """Runs steps of the ``process`` (its name in the readiness report), retrying their
    transient failures in place with backoff capped at ``max_delay`` seconds; any other
    failure is raised."""

    def __init__(self, process: str, max_delay: float) -> None:
        self.process = process
        self.max_delay = max_delay
        self.ready = True

    async def __call__(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until it succeeds or fails with an error that is not transient."""
        delay = FIRST_DELAY_SECONDS
        while True:
            try:
                result = await step()
            except Exception as exc:
                if classify(exc) is not Disposition.TRANSIENT:
                    raise
                self.ready = False
                set_ready(self.process, False)
                log.warning("transient_error", error_class=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            if not self.ready:
                self.ready = True
                set_ready(self.process, True)
            return result
