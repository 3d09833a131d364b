"""Waiting on a condition with a deadline (never a bare sleep standing in for a wait)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 30.0, every: float = 0.1
) -> T:
    """Return ``check()``'s first truthy result; fail when ``timeout`` seconds pass without one."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(every)


def eventually_sync(check: Callable[[], T], timeout: float = 30.0, every: float = 0.1) -> T:
    """``eventually`` for code outside an event loop (a subprocess coming up)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        time.sleep(every)
