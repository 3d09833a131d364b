"""Replaying dead letters: redrive selected records to their original topic, at most once each.

One run of ``replay`` for a dead-letter topic:

1. takes the topic's replay lock in PostgreSQL (a second concurrent run fails fast instead of
   racing), and reads the ledger of what was already replayed;
2. reads the selected records up to the end offsets seen at the start;
3. sends each one not yet replayed (or each one, with ``again``) with its key, value and headers,
   minus the ``qm.dlt.*`` headers, plus ``qm.replayed_from=topic:partition:offset``;
4. after the broker acknowledged a batch, records its offsets in the ledger.

A failed capture's dead letter bound for ``qm.captures`` is not sent: its capture is handed off
again as ``qm captures retry`` does, with its ledger row in the same transaction, or reported as
not replayed when the capture is not FAILED (``app.dlt.captures``). The report never counts as
replayed a record that had no effect.

A crash between an ack and its ledger row replays that record again on the next run
(at least once): harmless, because requests are idempotent by ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.transaction import TxServices
from app.crypto import SecretBox
from app.db.engine import make_engine
from app.dlt.captures import FAILED, NotRearmed, capture_named, rearm, status_of
from app.dlt.letter_headers import PREFIX, REPLAYED_FROM, OffsetRange
from app.dlt.reader import (
    CONNECT_TIMEOUT_SECONDS,
    DLT_SUFFIX,
    DeadLetter,
    DltError,
    DltReader,
    ScanPlan,
    Selection,
    kafka_unreachable,
    open_reader,
)
from app.dlt.values import ValueStore
from app.kafka import producer_options
from app.outbox.writer import MESSAGE_ID
from app.settings import Settings
from app.store.dlt_replays import (
    ReplayedOffset,
    list_replayed,
    list_replayed_at,
    record_replays,
    try_lock_topic,
    unlock_topic,
)

BATCH_SIZE = 200
REPLAY_MAX_BYTES = 64 * 1024 * 1024
# how long one batch may wait for the broker's acks
ACK_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay: where to (None: each record's original topic), and how carefully."""

    to: str | None = None
    dry_run: bool = False
    again: bool = False
    rate: float | None = None


@dataclass(slots=True)
class ReplayReport:
    """What one run selected, sent and skipped."""

    topic: str
    dry_run: bool = False
    selected: int = 0
    replayed: int = 0
    already_replayed: int = 0
    # of those, dead letters of copies that failed again after an earlier replay (qm.replayed_from)
    failed_again: int = 0
    # acked copies whose ledger row another run had written first (only if the lock was lost)
    raced: int = 0
    targets: Counter[str] = field(default_factory=Counter)
    # dry run: what would be sent, and where to
    planned: list[tuple[DeadLetter, str]] = field(default_factory=list)
    # failed captures' dead letters left alone (their capture is not FAILED): not replayed
    not_rearmed: list[NotRearmed] = field(default_factory=list)


class ReplayProgress(Protocol):
    """What a progress display is told: the offsets to scan, then each scanned record and how
    many copies were sent so far."""

    def start(self, total: int) -> None: ...

    def advance(self, scanned: int, sent: int) -> None: ...


class Pacer:
    """At most ``rate`` sends per second, evenly spaced; no limit when ``rate`` is None."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise DltError("--rate must be greater than 0")
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def wait(self) -> None:
        """Return when the next send is allowed."""
        if not self._interval:
            return
        now = self._clock()
        if self._next is not None and self._next > now:
            await self._sleep(self._next - now)
            now = self._next
        self._next = now + self._interval


def replay_headers(letter: DeadLetter) -> list[tuple[str, bytes | None]]:
    """The headers of the replayed copy: the original ones and where this copy came from.

    Stripped: ``qm.dlt.*``, the last ``qm.replayed_from`` and the outbox's ``qm.message_id``
    (the copy is a new message); every other header stays, in its order, null values too."""
    kept = [
        (name, value)
        for name, value in letter.headers
        if not name.startswith(PREFIX) and name not in (REPLAYED_FROM, MESSAGE_ID)
    ]
    return [*kept, (REPLAYED_FROM, letter.coordinates.encode())]


def target_of(letter: DeadLetter, to: str | None) -> str:
    """Where ``letter`` goes: ``to``, else its original topic, else the DLT's name minus ``.dlt``."""
    if to is not None:
        return to
    return letter.original_topic or letter.topic.removesuffix(DLT_SUFFIX)


# --- the ledger --------------------------------------------------------------------------


def _where(settings: Settings) -> str:
    url = make_url(settings.database_url)
    host = url.host or url.query.get("host") or "localhost"
    return f"{host}:{url.port or 5432}/{url.database or ''}"


@contextmanager
def _database_errors(settings: Settings) -> Iterator[None]:
    """Database failures as one line an operator can act on."""
    try:
        yield
    except DBAPIError as exc:
        first_line = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        if "dlt_replays" in first_line and "does not exist" in first_line:
            raise DltError("table dlt_replays is missing; run `qm migrate`") from exc
        if exc.connection_invalidated or isinstance(exc.orig, OSError):
            raise DltError(f"PostgreSQL connection to {_where(settings)} was lost") from exc
        raise DltError(f"PostgreSQL failed: {first_line or type(exc.orig).__name__}") from exc
    except (SQLAlchemyError, OSError) as exc:
        raise DltError(f"PostgreSQL failed: {type(exc).__name__}") from exc


def _connect_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_SECONDS:.0f}s"
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, OSError):
        return "connection failed"
    # the server's own words, e.g. 'database "x" does not exist'; they never hold a password
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


class Ledger:
    """The replay ledger of one dead-letter topic on one connection (that may hold its lock)."""

    def __init__(self, conn: AsyncConnection, settings: Settings, topic: str) -> None:
        self._conn = conn
        self._settings = settings
        self.topic = topic
        self._services: TxServices | None = None  # built when a capture is first re-armed

    async def replayed(self, ranges: list[OffsetRange]) -> set[tuple[int, int]]:
        with _database_errors(self._settings):
            found = await list_replayed(self._conn, self.topic, ranges)
            await self._conn.commit()
            return found

    async def replayed_at(self, coordinates: tuple[str, int, int]) -> bool:
        """Whether the dead letter at ``coordinates`` was replayed before."""
        with _database_errors(self._settings):
            found = await list_replayed_at(self._conn, [coordinates])
            await self._conn.commit()
            return bool(found)

    def values(self) -> ValueStore:
        """Values kept by reference, read on this ledger's connection."""
        return ValueStore(self._settings, self._conn)

    async def capture_status(self, capture_id: str) -> str:
        """A capture's status now (``missing`` if there is none)."""
        with _database_errors(self._settings):
            status = await status_of(self._conn, capture_id)
            await self._conn.commit()
            return status

    async def rearm(self, letter: DeadLetter, capture_id: str, *, again: bool) -> str | None:
        """Hand the capture of ``letter`` off again and record ``letter`` in one transaction;
        None when that happened, else the capture's status (and nothing changed)."""
        if self._services is None:
            self._services = TxServices(self._settings, SecretBox.from_settings(self._settings))
        with _database_errors(self._settings):
            return await rearm(
                self._conn, self._services, self.topic, letter, capture_id, again=again
            )

    async def record(self, rows: list[ReplayedOffset], *, again: bool) -> int:
        """Record acked copies; return how many rows this call wrote."""
        with _database_errors(self._settings):
            written = await record_replays(self._conn, self.topic, rows, again=again)
            await self._conn.commit()
            return len(written)


@asynccontextmanager
async def open_ledger(settings: Settings, topic: str, *, lock: bool) -> AsyncIterator[Ledger]:
    """A ledger on its own connection; with ``lock``, holding ``topic``'s replay lock."""
    engine = make_engine(settings, pool_size=1)
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                conn = await engine.connect()
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise DltError(
                f"PostgreSQL cannot be reached at {_where(settings)}: {_connect_failure(exc)}"
            ) from exc
        try:
            if lock:
                with _database_errors(settings):
                    locked = await try_lock_topic(conn, topic)
                    await conn.commit()
                if not locked:
                    raise DltError(f"another `qm dlt replay` of {topic} is running; try later")
            try:
                yield Ledger(conn, settings, topic)
            finally:
                if lock:
                    # best effort: closing the connection below frees a session lock anyway
                    with contextlib.suppress(SQLAlchemyError, OSError):
                        await unlock_topic(conn, topic)
                        await conn.commit()
        finally:
            await conn.close()
    finally:
        await engine.dispose()


# --- sending -----------------------------------------------------------------------------


class _Sender:
    """Sends copies in batches; after each batch's acks, writes the ledger rows."""

    def __init__(
        self, producer: AIOKafkaProducer, ledger: Ledger, report: ReplayReport, again: bool
    ) -> None:
        self._producer = producer
        self._ledger = ledger
        self._report = report
        self._again = again
        self._pending: list[tuple[DeadLetter, str, asyncio.Future[object]]] = []

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def send(self, letter: DeadLetter, target: str) -> None:
        future = await self._producer.send(
            target, value=letter.value, key=letter.key, headers=replay_headers(letter)
        )
        self._pending.append((letter, target, future))

    async def flush(self) -> None:
        """Wait for every pending ack, record the acked ones, then report any failure."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        futures = [future for _, _, future in pending]
        # asyncio.wait, unlike gather under a timeout, leaves unfinished sends alone
        await asyncio.wait(futures, timeout=ACK_TIMEOUT_SECONDS)
        outcomes = [_failure(future) for future in futures]
        acked = [
            (letter, target)
            for (letter, target, _), failure in zip(pending, outcomes, strict=True)
            if failure is None
        ]
        rows = [ReplayedOffset(letter.partition, letter.offset, target) for letter, target in acked]
        written = await self._ledger.record(rows, again=self._again)
        self._report.replayed += len(acked)
        self._report.raced += len(acked) - written
        self._report.targets.update(target for _, target in acked)
        failures = [failure for failure in outcomes if failure is not None]
        if failures:
            first = failures[0]
            raise DltError(
                f"{len(failures)} of {len(pending)} copies were not acknowledged "
                f"({type(first).__name__}: {first}); run replay again to retry them"
            )


def _failure(future: asyncio.Future[object]) -> BaseException | None:
    """Why a send was not acknowledged, or None when it was."""
    if not future.done():
        return TimeoutError(f"no ack within {ACK_TIMEOUT_SECONDS:.0f}s")
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


@asynccontextmanager
async def open_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer (acks=all); a broker that cannot be reached is a ``DltError``."""
    # the broker decides what is too large: a value kept by reference may be larger than the
    # client's own default limit, and it fitted the original topic once
    producer = AIOKafkaProducer(**producer_options(settings), max_request_size=REPLAY_MAX_BYTES)
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await producer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise kafka_unreachable(settings, exc) from exc
        yield producer
    finally:
        await producer.stop()


# --- the run -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    """One scan of a plan: counts, lists (dry run) or sends each selected record."""

    reader: DltReader
    plan: ScanPlan
    selection: Selection
    options: ReplayOptions
    existing: set[str]
    report: ReplayReport
    progress: ReplayProgress | None
    captures_topic: str
    ledger: Ledger | None = None
    done: set[tuple[int, int]] = field(default_factory=set)
    checked: set[str] = field(default_factory=set)

    async def walk(self, sender: _Sender | None, pacer: Pacer, batch: int) -> None:
        async with contextlib.aclosing(self.reader.read(self.plan)) as letters:
            async for letter in letters:
                await self._one(letter, sender, pacer, batch)

    async def _one(
        self, letter: DeadLetter, sender: _Sender | None, pacer: Pacer, batch: int
    ) -> None:
        report = self.report
        if self.progress is not None:
            sent = report.replayed + (sender.pending if sender is not None else 0)
            self.progress.advance(1, sent)
        if not self.selection.matches(letter):
            return
        report.selected += 1
        if (letter.partition, letter.offset) in self.done or await self._failed_again(letter):
            report.already_replayed += 1
            return
        target = target_of(letter, self.options.to)
        if target not in self.checked:
            _check_target(target, letter.topic, self.existing, letter)
            self.checked.add(target)
        capture_id = capture_named(letter, target, self.captures_topic)
        if capture_id is not None:
            await self._rearm(letter, capture_id, target, dry_run=sender is None)
            return
        if sender is None:  # dry run
            report.planned.append((letter, target))
            report.targets[target] += 1
            return
        if letter.value_ref is not None and self.ledger is not None:
            [letter] = await self.ledger.values().restore([letter])
        await pacer.wait()
        await sender.send(letter, target)
        if sender.pending >= batch:
            await sender.flush()

    async def _rearm(
        self, letter: DeadLetter, capture_id: str, target: str, *, dry_run: bool
    ) -> None:
        """A failed capture's dead letter: its capture handed off again (a dry run only looks
        whether it is FAILED), or left alone and reported with its status."""
        assert self.ledger is not None  # replay() opens it before any walk
        report = self.report
        if dry_run:
            status = await self.ledger.capture_status(capture_id)
            left = None if status == FAILED else status
        else:
            left = await self.ledger.rearm(letter, capture_id, again=self.options.again)
        if left is not None:
            report.not_rearmed.append(NotRearmed(letter, capture_id, left))
            return
        report.targets[target] += 1
        if dry_run:
            report.planned.append((letter, target))
        else:
            report.replayed += 1

    async def _failed_again(self, letter: DeadLetter) -> bool:
        """A copy that failed again: its parent was replayed, so this selection sent it once
        (only ``--again`` sends it again)."""
        parent = letter.parent
        if self.options.again or parent is None or self.ledger is None:
            return False
        if await self.ledger.replayed_at(parent):
            self.report.failed_again += 1
            return True
        return False


async def replay(
    settings: Settings,
    topic: str,
    selection: Selection,
    options: ReplayOptions,
    progress: ReplayProgress | None = None,
) -> ReplayReport:
    """Replay the dead letters of ``topic`` that ``selection`` picks; see the module docstring."""
    pacer = Pacer(options.rate)
    batch = min(BATCH_SIZE, max(1, int(options.rate))) if options.rate else BATCH_SIZE
    async with open_reader(settings) as reader:
        topic = await reader.resolve(topic)
        existing = await reader.all_topics()
        if options.to is not None:
            _check_target(options.to, topic, existing)
        plan = await reader.plan(topic, selection)
        report = ReplayReport(topic, dry_run=options.dry_run)
        captures_topic = settings.topic("captures")
        run = _Run(reader, plan, selection, options, existing, report, progress, captures_topic)
        async with open_ledger(settings, topic, lock=not options.dry_run) as ledger:
            run.ledger = ledger
            if not options.again:
                run.done = await ledger.replayed(plan.ranges)
            if progress is not None:
                progress.start(plan.total)
            if options.dry_run:
                await run.walk(None, pacer, batch)
                return report
            async with open_producer(settings) as producer:
                sender = _Sender(producer, ledger, report, options.again)
                try:
                    await run.walk(sender, pacer, batch)
                finally:
                    # what was sent before a failure or Ctrl-C is still recorded once acked
                    await sender.flush()
    return report


def _check_target(
    target: str, source: str, existing: set[str], letter: DeadLetter | None = None
) -> None:
    where = f" (from {letter.coordinates})" if letter is not None else ""
    if target == source:
        raise DltError(f"cannot replay {source} into itself{where}")
    if target not in existing:
        raise DltError(f"target topic {target}{where} does not exist; name one with --to")
