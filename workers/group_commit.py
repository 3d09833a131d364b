"""Group commit with per-key order: items wait in the order they were put and go, up to
``batch_max`` at a time, into at most ``transactions`` shared transactions running at once.

Takes follow ``workers.pipeline.KeyedQueue``: two items of one key are never in two running
transactions, and a later one never commits before an earlier one. A shared transaction that fails
puts its items back at the front, in order, each to go alone (where its failure is handled), and
their keys hold back the later items of those keys until each has gone. Nothing waits for a timer:
a lone item goes at once. A lone run is expected to settle its item whatever happens; if it raises
all the same, the item goes again after a capped backoff (its key held meanwhile), up to
``attempts`` runs; then ``give_up`` settles it (a dead letter of its raw bytes), tried with the same
backoff for as long as it raises: an item is never settled wrongly, never run for ever, and every
failure is logged. ``close`` ends those waits: an item not settled then gets no outcome here (its
record is read again), so stopping never waits on an item that keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import structlog
from prometheus_client import Histogram

from app.errors import unexpected_delay
from app.health import REQUESTS_PER_TRANSACTION
from workers.pipeline import KeyedQueue, Waiting

log = structlog.get_logger()
T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Runs ``shared`` over lists of waiting items and ``alone`` over single ones; each item's
    outcome is the future ``put`` returned (cancelled when ``close`` drops it unstarted)."""

    def __init__(
        self,
        *,
        batch_max: int,
        transactions: int,
        shared: Callable[[list[T]], Awaitable[list[str]]],
        alone: Callable[[T], Awaitable[str]],
        give_up: Callable[[T, Exception, int], Awaitable[str]] | None = None,
        attempts: int = 3,
        retry_max_seconds: float = 30.0,
        sizes: Histogram = REQUESTS_PER_TRANSACTION,
    ) -> None:
        self.batch_max = batch_max
        self.transactions = transactions
        self.attempts = attempts
        self.retry_max_seconds = retry_max_seconds
        self._shared = shared
        self._sizes = sizes  # items per shared run, labelled by whether it went through
        self._alone = alone
        self._give_up = give_up
        self._closed = asyncio.Event()
        self._waiting: KeyedQueue[tuple[T, asyncio.Future[str]]] = KeyedQueue()
        self._committers: set[asyncio.Task[None]] = set()

    def put(self, item: T, key: Hashable | None, *, alone: bool = False) -> asyncio.Future[str]:
        """Put ``item`` in line (``alone``: it never shares a transaction); its outcome to come."""
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.put((item, outcome), key, alone=alone or self.batch_max <= 1)
        self._start_committers()
        return outcome

    def close(self) -> None:
        """Start nothing more: the items still waiting get no outcome (their futures are
        cancelled), and a lone run waiting to go again stops waiting (its item too)."""
        self._closed.set()
        for entry in self._waiting.drop():
            entry.item[1].cancel()

    async def drain(self) -> None:
        """Wait for the transactions running."""
        await asyncio.gather(*self._committers, return_exceptions=True)

    def _start_committers(self) -> None:
        # a committer that found nothing more to do has returned, though its task may still be
        # in the set until its done-callback runs: count only those still running
        running = sum(not committer.done() for committer in self._committers)
        if running < self.transactions and len(self._waiting):
            committer = asyncio.create_task(self._commit_waiting(), name="group-commit")
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)

    async def _commit_waiting(self) -> None:
        """Commit what may go, as many per transaction as allowed, until nothing can."""
        while taken := self._waiting.take(self.batch_max):
            if taken[0].alone:
                [entry] = taken
                try:
                    outcome = await self._run_alone(entry.item[0])
                    if outcome is None:
                        entry.item[1].cancel()  # stopping: its record is read again
                    else:
                        _settle(entry, outcome)
                finally:
                    self._waiting.release(entry)
            else:
                await self._commit_shared(taken)
            self._start_committers()  # keys freed: more may go side by side now

    async def _run_alone(self, item: T) -> str | None:
        """The item's lone run, again after a capped backoff while it raises, at most
        ``attempts`` times; then ``give_up`` until it settles the item. None: stopped first."""
        failure: Exception | None = None
        runs = 0
        while not self._closed.is_set():
            runs += 1
            giving_up = failure is not None and runs > self.attempts and self._give_up is not None
            try:
                if giving_up:
                    assert self._give_up is not None and failure is not None
                    return await self._give_up(item, failure, runs - 1)
                return await self._alone(item)
            except Exception as exc:  # noqa: BLE001 - never settled wrongly, never dropped
                failure = failure if giving_up else exc
                delay = unexpected_delay(runs, self.retry_max_seconds)
                log.error(
                    "lone_run_failed",
                    error_class=type(exc).__name__,
                    attempts=runs,
                    giving_up=giving_up,
                    retry_in=delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
        return None

    async def _commit_shared(self, taken: list[Waiting[tuple[T, asyncio.Future[str]]]]) -> None:
        """One transaction for the taken items; if it fails, each goes again alone, in order."""
        try:
            outcomes = await self._shared([entry.item[0] for entry in taken])
        except Exception as exc:  # noqa: BLE001 - each item is tried again on its own
            self._sizes.labels("false").observe(len(taken))
            log.info(
                "shared_transaction_failed", error_class=type(exc).__name__, requests=len(taken)
            )
            self._waiting.put_back(taken)  # at the front: later items of their keys wait
            return
        except BaseException:
            for entry in taken:
                self._waiting.release(entry)
            raise
        self._sizes.labels("true").observe(len(taken))
        for entry, outcome in zip(taken, outcomes, strict=True):
            _settle(entry, outcome)
            self._waiting.release(entry)


def _settle(entry: Waiting[tuple[T, asyncio.Future[str]]], outcome: str) -> None:
    future = entry.item[1]
    if not future.done():  # a caller that stopped waiting may have cancelled it
        future.set_result(outcome)
