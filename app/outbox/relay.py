"""The outbox relay: publishes committed outbox rows to Kafka, in id order per shard, then deletes them.

What it promises, and why it holds:

- **At least once.** A row is deleted only after the broker acknowledged it (acks=all). A relay
  that dies between the ack and the delete leaves the row for the next owner of its shard, which
  publishes it again; consumers drop the repeat by its ``qm.message_id`` header. A failed send, a
  missing topic or a broker that is down deletes nothing: the rows wait and are tried again.
- **No row blocks the others for good.** A row refused for good is dead-lettered or parked
  (``app.outbox.refusals``); a refused multi-row batch sends its partition one row a round.
- **Order per key** (per topic and key). A key always hashes to one shard; a shard is owned by one
  relay at a time (a session advisory lock on the relay's own connection, which also does the
  reads and deletes, so a relay that lost its connection cannot read a shard it no longer owns);
  the owner sends the shard's rows in id order through one idempotent producer (in producer
  batches per partition, keys mapped to partitions as Kafka clients do by default, unless the row
  names its partition: a reply routed to its client's partition). The writer makes
  rows of one key commit in id order, so a relay never sees a later row of a key before an earlier
  one. A row of another key that took a lower id but commits late is simply read by a later round:
  rows are deleted by id, there is no watermark that could pass it by. After a failed send the
  producer is rebuilt: its idempotent sequence numbers have already refused every later batch of
  that partition in the round, and later rounds send nothing of the partition (below), so nothing
  of a key overtakes the row that failed.
- **Fair share and takeover.** Relays count each other (sessions named ``qm-relay`` on this
  database) and each holds at most ``ceil(S / relays)`` shards, releasing extras. When a relay dies
  its connection closes and PostgreSQL drops its locks; each survivor rebalances every
  ``outbox_poll_seconds``, so **a dead relay's shards are owned again within
  2 x outbox_poll_seconds plus one survivor round in flight** (two rebalances: the first may
  still count the dead session; a survivor rebalances on its poll even with rounds in flight).
  The chaos test asserts this with a 0.2 s poll.

A round is: rebalance when due, read up to ``outbox_batch_size`` rows of every owned shard, send
them, await every ack, call ``after_ack`` (the benchmark's and tests' hook), delete the acked rows.
``run_once`` does one round alone. The loop (``run``) keeps up to ``outbox_pipeline_depth``
rounds in flight while shards have a backlog: as long as a shard had a full batch, it reads and
sends the next round while the acks of the earlier ones are pending, unless a round in flight
holds rows back. Otherwise a round starts when none is in flight, on a ``NOTIFY qm_outbox``
from a committing writer or the poll interval (with none allowed to start, the loop sleeps until
a round ends, the stop or the next rebalance):
rows that come at a moderate rate then share a round instead of each paying for one (measured:
docs/performance.md). The pipeline keeps the promises above:

- A read passes over the rows of the rounds still in flight (by id, not by a watermark: a row of
  another key that took a lower id but commits late is read by the next round).
- A partition's rows of a round go to the producer only after the earlier rounds in flight have
  settled that partition, and only if every row of theirs for it was acked
  (``app.outbox.sending``); a row that failed or was held back is read again, before any later
  row of its key, by a round that starts after its own ended. So no round starts while one in
  flight holds rows back: a later round would hold its rows of the partition in turn, and so on
  for as long as rounds overlap, the whole shard waiting (a refused batch sends one row a round).
- After a failed send, no round starts until those in flight have ended; then the producer is
  rebuilt. A lost session likewise: nothing is deleted but what was acked, by the session that
  read it.
- A shard given up in a rebalance is read no more at once, but its lock is released only when
  its rounds in flight have ended, so two relays never have rows of one shard in flight.
- ``stop`` lets the rounds in flight end within a grace period (their acked rows are deleted),
  also while the relay waits for them to start over; then the shard locks go at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db.engine import make_engine
from app.kafka import producer_options
from app.outbox import metrics
from app.outbox.refusals import settle_refusals
from app.outbox.relay_rounds import (
    Backoff,
    RelayRound,
    any_shard_full,
    collect,
    discard,
    drain,
    note_error,
    vacuum,
    wait_any,
)
from app.outbox.sending import MAX_MESSAGE_BYTES, InFlight, Sender
from app.outbox.topics import TopicPartitions
from app.settings import Settings
from app.store.outbox import (
    NOTIFY_CHANNEL,
    UnsentRow,
    backlog,
    count_relays,
    delete_rows,
    fetch_unsent,
    lock_shards,
    prepare_relay_session,
    shard_owners,
    unlock_shards,
)

log = structlog.get_logger()

# Called with the rows the broker acknowledged, before they are deleted.
AfterAck = Callable[[Sequence[UnsentRow]], Awaitable[None]]

# The producer's request_timeout_ms, which is also how long aiokafka keeps a sent batch whose
# partition lost its leader. A topic deleted after the producer learned it is such a case: its
# batch fails only then, and the round waits for it. aiokafka's 40 s would hold every shard's
# round that long; 10 s is still far above a produce round trip (acks=all).
REQUEST_TIMEOUT_MS = 10_000
SHUTDOWN_GRACE_SECONDS = 10.0  # how long a stopping relay lets its rounds in flight finish
# how long a relay starting over (a failed send, a lost session) waits for its rounds in flight:
# each ends within the producer's time-out, unless after_ack holds it
ROUND_TIMEOUT_SECONDS = 60.0
# the relay vacuums the outbox itself after deleting this many rows, so the dead rows every read
# walks past stay few whatever the server's autovacuum_naptime (docs/performance.md)
VACUUM_EVERY_ROWS = 10_000
__all__ = ["MAX_MESSAGE_BYTES", "AfterAck", "Relay"]


class Relay:
    """Owns outbox shards and publishes their rows; ``run`` loops, ``run_once`` does one round."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        after_ack: AfterAck | None = None,
    ) -> None:
        self.settings = settings
        self.shard_count = settings.outbox_shards
        self.owned: set[int] = set()
        self.after_ack = after_ack
        self._engine = engine
        self._owns_engine = engine is None
        self._session: AsyncConnection | None = None
        self._session_pid = 0
        self._producer: AIOKafkaProducer | None = None
        self._sender = Sender()
        self._wake = asyncio.Event()
        self._rebalance_at = 0.0
        self._topics = TopicPartitions(settings.transient_retry_max_seconds)
        self._db = asyncio.Lock()  # the session runs one statement at a time
        self._rounds: list[InFlight] = []  # rounds in flight, oldest first
        self._leaving: set[int] = set()  # shards given up, locked until their rounds end
        self._deleted = 0  # rows deleted since the last vacuum
        self._vacuum: asyncio.Task[None] | None = None
        self._report = metrics.PublishReport()
        self._offset = random.randrange(self.shard_count)  # where this relay starts taking shards

    # --- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run rounds until ``stop`` is set, up to ``outbox_pipeline_depth`` of them in flight;
        then give the rounds in flight a grace period to finish, and close."""
        backoff = Backoff(cap=self.settings.transient_retry_max_seconds)
        depth = self.settings.outbox_pipeline_depth
        in_flight: list[asyncio.Task[RelayRound]] = []
        more, poll_at = True, 0.0
        log.info("outbox_relay_started", shards=self.shard_count, pipeline_depth=depth)
        try:
            while not stop.is_set():
                failed, errors = collect(in_flight, backoff)
                if failed or errors or (self._sender.broken and in_flight):
                    # start over with no round in flight: a new producer, or a new session
                    await self._start_over(in_flight, errors, stop, backoff)
                    more = True
                    continue
                # rounds overlap only while shards have a backlog: a round for a NOTIFY waits
                # for the one in flight, so rows that come at a moderate rate share a round.
                # Nor while a round in flight holds rows back: a later round would hold its rows
                # of their partition in turn, and so on while rounds overlap (app.outbox.sending)
                overlap = more and not any(r.sending and r.sending.holds for r in self._rounds)
                can_start = len(in_flight) < depth and (overlap or not in_flight)
                due = more or self._wake.is_set() or time.monotonic() >= poll_at
                if not can_start or not due:
                    try:  # a round in flight does not hold back the rebalance
                        await self._rebalance_when_due()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - as a round's failure
                        await self._start_over(in_flight, [exc], stop, backoff)
                        continue
                if can_start and due:
                    try:
                        await self._release_leaving()
                        started = await self._start_round()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the relay outlives any failure
                        await self._start_over(in_flight, [exc], stop, backoff)
                        continue
                    poll_at = time.monotonic() + self.settings.outbox_poll_seconds
                    more = started.full
                    if started.sending is not None:
                        in_flight.append(asyncio.create_task(self._finish_round(started)))
                    continue
                # when no round may start, only a round's end, the stop or the next rebalance
                # wakes the loop: never a deadline already past (the poll's, during a long round)
                now = time.monotonic()
                rebalance_at = self._rebalance_at
                if rebalance_at <= now:  # not rebalanced (no session yet): try again in a poll
                    rebalance_at = now + self.settings.outbox_poll_seconds
                deadline = min(poll_at, rebalance_at) if can_start else rebalance_at
                await self._wait(stop, in_flight, can_start, max(0.0, deadline - now))
        finally:
            for error in (await drain(in_flight, SHUTDOWN_GRACE_SECONDS))[1]:
                note_error(error)
            self._report.flush(force=True)
            await self.close()
            log.info("outbox_relay_stopped")

    async def _wait(
        self, stop: asyncio.Event, in_flight: list[asyncio.Task[RelayRound]], can_start: bool,
        timeout: float,
    ) -> None:  # fmt: skip
        """Until ``stop``, a round in flight ends, or (when a round may start) a NOTIFY or the
        poll."""
        events = [stop, self._wake] if can_start else [stop]
        waiters = [asyncio.create_task(event.wait()) for event in events]
        try:
            await asyncio.wait(
                [*waiters, *in_flight], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _start_over(
        self, in_flight: list[asyncio.Task[RelayRound]], errors: list[Exception],
        stop: asyncio.Event, backoff: Backoff,
    ) -> None:  # fmt: skip
        """Let the rounds in flight end (within the grace once ``stop`` is set), start over with
        what failed (a new session, its locks gone, or a new producer), then back off."""
        _, more_errors = await drain(in_flight, ROUND_TIMEOUT_SECONDS, stop, SHUTDOWN_GRACE_SECONDS)
        kinds = {note_error(exc) for exc in [*errors, *more_errors]}
        if kinds - {"database"}:
            await self._drop_producer()
        if kinds - {"kafka"}:
            await self._drop_session()
        await wait_any([stop], backoff.next_delay())

    # --- one round ------------------------------------------------------------------------

    async def run_once(self) -> RelayRound:
        """One round alone: rebalance when due, publish every owned shard's next batch, await
        every ack, delete what was acked."""
        return await self._finish_round(await self._start_round())

    async def _start_round(self) -> InFlight:
        """Rebalance when due, read the owned shards' next rows (passing over rows of rounds in
        flight) and start sending them."""
        self._wake.clear()
        session = await self._connect()
        producer = await self._ensure_producer()
        now = time.monotonic()
        limit = self.settings.outbox_batch_size
        async with self._db:
            if now >= self._rebalance_at:
                await self._rebalance(session)
                await self._refresh_backlog(session)
                self._rebalance_at = now + self.settings.outbox_poll_seconds
            shards = tuple(sorted(self.owned))
            earlier = list(self._rounds)  # the rounds whose rows this read passes over
            busy = {row.id for started in earlier for row in started.rows}
            rows = await fetch_unsent(session, shards, limit, self._topics.in_backoff(now), busy)
            started = InFlight(session, shards, rows, time.monotonic(), any_shard_full(rows, limit))
            if rows:
                self._rounds.append(started)
        if not rows:
            return started
        try:
            resolved = await self._topics.resolve(producer, rows)
            started.sending = self._sender.start(
                producer, rows, resolved, [r.sending for r in earlier if r.sending is not None]
            )
        except BaseException:
            self._rounds.remove(started)
            raise
        return started

    async def _finish_round(self, started: InFlight) -> RelayRound:
        """Await the round's acks, delete what was acked, settle what was refused."""
        if started.sending is None:
            return RelayRound(shards=started.shards)
        session = started.session
        try:
            outcome = await started.sending.settled()
            if outcome.acked:
                if self.after_ack is not None:
                    await self.after_ack(outcome.acked)
                async with self._db:
                    await delete_rows(session, [(row.id, row.topic) for row in outcome.acked])
                self._report.published(outcome.acked, outcome.acked_at - started.fetched_at)
                self._vacuum_when_due(len(outcome.acked))
            async with self._db:
                dead, parked = await settle_refusals(session, self.settings, outcome)
        finally:
            if started in self._rounds:  # its rows may be read again; its shards released
                self._rounds.remove(started)
        return RelayRound(
            shards=started.shards,
            published=len(outcome.acked),
            failed=len(outcome.failed),
            waiting=outcome.waiting,
            full=started.full and not outcome.failed,
            dead_lettered=dead,
            parked=parked,
        )

    # --- connections ----------------------------------------------------------------------

    async def _connect(self) -> AsyncConnection:
        """The relay's session: autocommit, named, listening; it holds the shard locks."""
        if self._session is not None and not self._session.closed:
            return self._session
        if self._engine is None:
            self._engine = make_engine(self.settings, pool_size=1)
        conn = await self._engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await prepare_relay_session(conn)
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.add_listener(NOTIFY_CHANNEL, self._on_notify)
            driver.add_termination_listener(self._on_terminated)
            self._session_pid = int(driver.get_server_pid())
        except BaseException:
            await discard(conn)
            raise
        self._session = conn
        self._rebalance_at = 0.0
        log.info("outbox_relay_connected", backend_pid=self._session_pid)
        return conn

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def _on_terminated(self, *_: object) -> None:
        self._wake.set()

    async def _drop_session(self, *, closing: bool = False) -> None:
        """Forget the session; its locks went (or go) with it."""
        if self.owned:
            if closing:
                log.info("outbox_shards_released", shards=sorted(self.owned))
            else:
                log.warning("outbox_shards_lost", shards=sorted(self.owned))
            metrics.SHARDS_OWNED.dec(len(self.owned))
            self.owned.clear()
        self._leaving.clear()
        if self._session is not None:
            await discard(self._session)
            self._session = None

    async def _ensure_producer(self) -> AIOKafkaProducer:
        # never under a round in flight: the loop lets them end first
        if self._producer is not None and self._sender.broken and not self._rounds:
            log.info("outbox_producer_rebuilt")
            await self._drop_producer()
        if self._producer is None:
            # no linger: a round hands the producer all its rows before it yields, so they
            # batch anyway, and a lone row leaves at once
            options = producer_options(self.settings)
            options.update(linger_ms=0, request_timeout_ms=REQUEST_TIMEOUT_MS)
            producer = AIOKafkaProducer(**options)
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
            self._sender.broken = False
            self._topics.forget()  # a new producer learns every topic again
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.stop(), SHUTDOWN_GRACE_SECONDS)
        except TimeoutError:
            # only with sends still unacknowledged (broker down); their rows are still in the table
            log.warning("outbox_producer_abandoned")

    def _vacuum_when_due(self, deleted: int) -> None:
        """Vacuum the outbox on a connection of its own (the rounds go on meanwhile) once
        VACUUM_EVERY_ROWS rows were deleted since the last time."""
        self._deleted += deleted
        if self._deleted < VACUUM_EVERY_ROWS or self._engine is None:
            return
        if self._vacuum is not None and not self._vacuum.done():
            return
        self._deleted = 0
        self._vacuum = asyncio.create_task(vacuum(self._engine))

    async def close(self) -> None:
        """Close the producer, then the session (which releases the shard locks at once), then
        let a vacuum in progress end (on its own connection)."""
        await self._drop_producer()
        await self._drop_session(closing=True)
        if self._vacuum is not None:  # a vacuum cut short is work lost: let it end first
            done, _ = await asyncio.wait({self._vacuum}, timeout=SHUTDOWN_GRACE_SECONDS)
            if not done:
                self._vacuum.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._vacuum
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # --- shards ---------------------------------------------------------------------------

    async def _rebalance(self, session: AsyncConnection) -> None:
        """Hold ``ceil(S / relays)`` shards: release extras, take free ones."""
        relays = await count_relays(session)
        target = math.ceil(self.shard_count / max(relays, 1))
        if len(self.owned) > target:
            extra = sorted(self.owned)[target:]
            self._set_owned(self.owned - set(extra))
            # a shard with rows in flight is read no more, but stays locked until they end
            self._leaving.update(extra)
            await self._unlock_idle(session)
            log.info("outbox_shards_released", shards=extra, relays=relays, target=target)
            return
        if len(self.owned) == target:
            return
        owners = await shard_owners(session)
        held = {s for s, pid in owners.items() if pid == self._session_pid} - self._leaving
        if held != self.owned:  # trust the database over our own bookkeeping
            self._set_owned(held)
        order = [(self._offset + step) % self.shard_count for step in range(self.shard_count)]
        taken: list[int] = []
        for shard in order:
            if len(self.owned) + len(taken) >= target:
                break
            if shard not in owners and await lock_shards(session, [shard]):
                taken.append(shard)
        if taken:
            self._set_owned(self.owned | set(taken))
            log.info("outbox_shards_taken", shards=taken, relays=relays, target=target)

    async def _rebalance_when_due(self) -> None:
        """Rebalance (and release the shards given up whose rounds ended) between rounds."""
        await self._release_leaving()
        now = time.monotonic()
        if now < self._rebalance_at or self._session is None or self._session.closed:
            return
        async with self._db:
            await self._rebalance(self._session)
            await self._refresh_backlog(self._session)
        self._rebalance_at = now + self.settings.outbox_poll_seconds

    async def _release_leaving(self) -> None:
        """Unlock the shards given up whose rounds in flight have ended."""
        if self._leaving and self._session is not None and not self._session.closed:
            async with self._db:
                await self._unlock_idle(self._session)

    async def _unlock_idle(self, session: AsyncConnection) -> None:
        busy = {row.shard for started in self._rounds for row in started.rows}
        idle = sorted(self._leaving - busy)
        if idle:
            await unlock_shards(session, idle)
            self._leaving.difference_update(idle)

    def _set_owned(self, shards: set[int]) -> None:
        metrics.SHARDS_OWNED.inc(len(shards) - len(self.owned))
        self.owned = set(shards)

    async def _refresh_backlog(self, session: AsyncConnection) -> None:
        stats = await backlog(session)
        metrics.BACKLOG_ROWS.set(stats.rows)
        metrics.OLDEST_AGE.set(stats.oldest_age_seconds)
