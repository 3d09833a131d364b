"""What the live overview's streams share: one snapshot a refresh for all of them, and a bound on
how many are open (per session and in all)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from app.overview import Snapshot

# streams one session (or one user the trusted header names) may hold open, and all of them
STREAMS_PER_SESSION = 3
STREAMS = 32


class SharedSnapshot:
    """The overview's snapshot, read at most once every ``max_age`` seconds however many streams
    and pages ask for it (each read runs several queries on the console's small pool)."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def latest(self, read: Callable[[], Awaitable[Snapshot]], max_age: float) -> Snapshot:
        async with self._lock:  # the streams waiting here get the one read that is under way
            if self._snapshot is None or time.monotonic() - self._read_at >= max_age:
                self._snapshot = await read()
                self._read_at = time.monotonic()
            return self._snapshot


class StreamSlots:
    """The live streams open, by session: a new one is refused past either bound."""

    def __init__(self, per_session: int = STREAMS_PER_SESSION, total: int = STREAMS) -> None:
        self.per_session = per_session
        self.total = total
        self._open: Counter[str] = Counter()

    def take(self, session: str) -> bool:
        """Whether ``session`` may open one more stream; if so, it holds a slot."""
        if self._open[session] >= self.per_session or self._open.total() >= self.total:
            return False
        self._open[session] += 1
        return True

    def give_back(self, session: str) -> None:
        self._open[session] -= 1
        if self._open[session] <= 0:
            del self._open[session]
