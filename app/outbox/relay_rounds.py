"""The bookkeeping of a relay round: what it did, its rows by outcome, its producer batches;
and the small waits, round collecting and clean-ups (the outbox's vacuum) of the relay's loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka.errors import KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import describe
from app.outbox import metrics
from app.store.outbox import UnsentRow, vacuum_outbox

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class RelayRound:
    """What one ``run_once`` did."""

    shards: tuple[int, ...]  # shards owned during the round
    published: int = 0  # rows acked by the broker and deleted
    failed: int = 0  # rows whose send failed; they stay for a later round
    waiting: int = 0  # rows read but not sent (topic unavailable, or an earlier row failed)
    dead_lettered: int = 0  # rows refused for good, now dead letters on the outbox.dlt topic
    parked: int = 0  # dead letters refused for good too: parked in the table
    full: bool = False  # some shard had a full batch: more rows are likely waiting

    @property
    def idle(self) -> bool:
        return self.published == 0 and self.failed == 0 and not self.full


@dataclass(slots=True)
class Outcome:
    """The rows of one round, sorted by what the broker did with them."""

    acked: list[UnsentRow] = field(default_factory=list)
    failed: list[UnsentRow] = field(default_factory=list)
    waiting: int = 0
    acked_at: float = 0.0
    # refused for good at once (too large for any message): dead-lettered this round
    too_large: list[UnsentRow] = field(default_factory=list)
    # refused, one more try counted: a row sent alone that the broker refused, or whose topic
    # the broker's metadata refused; dead-lettered once its tries reach the bound
    refused: list[tuple[UnsentRow, BaseException]] = field(default_factory=list)


@dataclass(slots=True)
class PartitionBatch:
    """One partition's rows in a producer batch, in id order."""

    builder: BatchBuilder
    rows: list[UnsentRow] = field(default_factory=list)

    def add(self, row: UnsentRow) -> bool:
        """Append ``row``; False when the batch is full."""
        if (
            self.builder.append(timestamp=None, key=row.key, value=row.payload, headers=row.headers)
            is None
        ):
            return False
        self.rows.append(row)
        return True


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff: 0.1 s, 0.2 s, ... up to ``cap``."""

    cap: float
    failures: int = 0

    def next_delay(self) -> float:
        self.failures = min(self.failures + 1, 32)
        return min(self.cap, 0.1 * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0


def any_shard_full(rows: Sequence[UnsentRow], limit: int) -> bool:
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.shard] = counts.get(row.shard, 0) + 1
    return any(count >= limit for count in counts.values())


def message_size(row: UnsentRow) -> int:
    return record_size(row.key, row.payload, row.headers)


def record_size(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> int:
    """Bytes of one record in a producer batch of its own."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


async def wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Return when any of ``events`` is set or after ``timeout`` seconds."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def discard(conn: AsyncConnection) -> None:
    """Close a connection for good (not back to a pool: it carries locks, a name, a LISTEN)."""
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()


def collect(
    in_flight: list[asyncio.Task[RelayRound]], backoff: Backoff | None = None
) -> tuple[bool, list[Exception]]:
    """Take the ended rounds off ``in_flight``: whether one failed a send, and their errors."""
    failed, errors = False, []
    for task in [task for task in in_flight if task.done()]:
        in_flight.remove(task)
        if task.cancelled():
            continue
        exc = task.exception()
        if isinstance(exc, Exception):
            errors.append(exc)
        elif exc is not None:
            raise exc
        elif task.result().failed:
            failed = True
        elif backoff is not None:
            backoff.reset()
    return failed, errors


async def drain(
    in_flight: list[asyncio.Task[RelayRound]],
    timeout: float,
    stop: asyncio.Event | None = None,
    grace: float = 0.0,
) -> tuple[bool, list[Exception]]:
    """Let the rounds in flight end within ``timeout`` (within ``grace`` once ``stop`` is set);
    cancel those that do not."""
    stop = stop or asyncio.Event()
    pending: set[asyncio.Future[Any]] = set(in_flight)
    deadline = time.monotonic() + timeout
    stopping = asyncio.create_task(stop.wait())
    try:  # each pass ends a round, or the stop, or the time-out
        while pending and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            _, pending = await asyncio.wait(
                pending | {stopping}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stopping)
    finally:
        stopping.cancel()
    if pending and stop.is_set():  # a stop does not wait for the whole timeout
        left = min(grace, deadline - time.monotonic())
        _, pending = await asyncio.wait(pending, timeout=max(left, 0.0))
    if pending:
        log.warning("outbox_round_abandoned", rounds=len(pending), grace_seconds=timeout)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending)
    return collect(in_flight)


def note_error(exc: Exception) -> str:
    """Count and log a round's failure; returns what failed: the broker ("kafka"), the database
    ("database"), or the relay ("unexpected")."""
    if isinstance(exc, KafkaError):
        kind = "kafka"
    elif isinstance(exc, SQLAlchemyError | OSError):
        kind = "database"
    else:
        kind = "unexpected"
    metrics.ERRORS.labels(kind).inc()
    log.warning(
        "outbox_round_failed", kind=kind, error_class=type(exc).__name__, error=describe(exc)
    )
    return kind


async def vacuum(engine: AsyncEngine) -> None:
    """Vacuum the outbox on a connection of its own; a failure is only logged."""
    started = time.monotonic()
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await vacuum_outbox(conn)
    except (SQLAlchemyError, OSError) as exc:  # autovacuum still comes; rows are not at stake
        log.warning("outbox_vacuum_failed", error_class=type(exc).__name__, error=describe(exc))
    else:
        log.debug("outbox_vacuumed", seconds=round(time.monotonic() - started, 3))
