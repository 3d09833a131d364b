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
  that partition, so nothing of a key overtakes the row that failed.
- **Fair share and takeover.** Relays count each other (sessions named ``qm-relay`` on this
  database) and each holds at most ``ceil(S / relays)`` shards, releasing extras. When a relay dies
  its connection closes and PostgreSQL drops its locks; each survivor rebalances every
  ``outbox_poll_seconds``, so **a dead relay's shards are owned again within
  2 x outbox_poll_seconds plus one survivor round in flight** (two rebalances: the first may still
  count the dead session). The chaos test asserts this with a 0.2 s poll.

A round (``run_once``) is: rebalance when due, read up to ``outbox_batch_size`` rows of every owned
shard, send them, await every ack, call ``after_ack`` (the benchmark's and tests' hook), delete the
acked rows. The loop (``run``) repeats at once while a shard had a full batch, else waits for a
``NOTIFY qm_outbox`` from a committing writer or the poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db.engine import make_engine
from app.errors import describe
from app.kafka import producer_options
from app.outbox import metrics
from app.outbox.refusals import definite, settle_refusals
from app.outbox.relay_rounds import (
    Backoff,
    Outcome,
    PartitionBatch,
    RelayRound,
    any_shard_full,
    discard,
    message_size,
    wait_any,
)
from app.outbox.topics import Resolved, TopicPartitions
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
SHUTDOWN_GRACE_SECONDS = 10.0  # how long a stopping relay lets its in-flight round finish
# the producer's max_request_size: a bigger row can never be published, and is dead-lettered
MAX_MESSAGE_BYTES = 1_048_576
# the key -> partition mapping every Kafka client uses by default (murmur2), so the relay's
# batches land where a plain producer's messages of the same key would
_PARTITIONER = DefaultPartitioner()
PARTITION_CACHE_SIZE = 100_000


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
        self._producer_broken = False
        self._wake = asyncio.Event()
        self._rebalance_at = 0.0
        self._topics = TopicPartitions(settings.transient_retry_max_seconds)
        self._partitions: dict[tuple[bytes, int], int] = {}
        self._single: set[tuple[str, int]] = set()  # refused batch: one row a round till one goes
        self._report = metrics.PublishReport()
        self._offset = random.randrange(self.shard_count)  # where this relay starts taking shards

    # --- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run rounds until ``stop`` is set; then finish the round in flight and close."""
        backoff = Backoff(cap=self.settings.transient_retry_max_seconds)
        log.info("outbox_relay_started", shards=self.shard_count)
        try:
            while not stop.is_set():
                try:
                    result = await self._round_unless_stopped(stop)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the relay outlives any failure; rows wait
                    await self._on_round_error(exc)
                    await wait_any([stop], backoff.next_delay())
                    continue
                if result is None:  # stopped
                    break
                if result.failed:
                    await wait_any([stop], backoff.next_delay())
                elif not result.full:
                    backoff.reset()
                    await wait_any([stop, self._wake], self.settings.outbox_poll_seconds)
                else:
                    backoff.reset()
        finally:
            self._report.flush(force=True)
            await self.close()
            log.info("outbox_relay_stopped")

    async def _round_unless_stopped(self, stop: asyncio.Event) -> RelayRound | None:
        """One round; if ``stop`` comes meanwhile, give the round a grace period to finish."""
        round_task = asyncio.create_task(self.run_once())
        stop_task = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({round_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not round_task.done():
                done, _ = await asyncio.wait({round_task}, timeout=SHUTDOWN_GRACE_SECONDS)
                if not done:
                    log.warning("outbox_round_abandoned", grace_seconds=SHUTDOWN_GRACE_SECONDS)
                    round_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await round_task
                    return None
            return round_task.result()
        finally:
            stop_task.cancel()
            if not round_task.done():
                round_task.cancel()

    async def _on_round_error(self, exc: Exception) -> None:
        """Start over with what failed: a new session (its locks are gone) or a new producer."""
        if isinstance(exc, KafkaError):
            kind = "kafka"
        elif isinstance(exc, SQLAlchemyError | OSError):
            kind = "database"
        else:
            kind = "unexpected"
        metrics.ERRORS.labels(kind).inc()
        log.warning("outbox_round_failed", kind=kind, error_class=_name(exc), error=describe(exc))
        if kind != "database":
            await self._drop_producer()
        if kind != "kafka":
            await self._drop_session()

    # --- one round ------------------------------------------------------------------------

    async def run_once(self) -> RelayRound:
        """Rebalance when due, publish every owned shard's next batch, delete what was acked."""
        self._wake.clear()
        session = await self._connect()
        producer = await self._ensure_producer()
        now = time.monotonic()
        if now >= self._rebalance_at:
            await self._rebalance(session)
            await self._refresh_backlog(session)
            self._rebalance_at = now + self.settings.outbox_poll_seconds
        shards = tuple(sorted(self.owned))
        limit = self.settings.outbox_batch_size
        rows = await fetch_unsent(session, shards, limit, self._topics.in_backoff(now))
        if not rows:
            return RelayRound(shards=shards)
        fetched_at = time.monotonic()
        resolved = await self._topics.resolve(producer, rows)
        outcome = await self._publish(producer, rows, resolved)
        if outcome.acked:
            if self.after_ack is not None:
                await self.after_ack(outcome.acked)
            await delete_rows(session, [(row.id, row.topic) for row in outcome.acked])
            self._report.published(outcome.acked, outcome.acked_at - fetched_at)
        dead, parked = await settle_refusals(session, self.settings, outcome)
        return RelayRound(
            shards=shards,
            published=len(outcome.acked),
            failed=len(outcome.failed),
            waiting=outcome.waiting,
            full=any_shard_full(rows, limit) and not outcome.failed,
            dead_lettered=dead,
            parked=parked,
        )

    async def _publish(
        self, producer: AIOKafkaProducer, rows: Sequence[UnsentRow], resolved: Resolved
    ) -> Outcome:
        """Send the rows in id order, batched per partition; await every ack; sort the rows."""
        outcome = Outcome()
        open_batches: dict[tuple[str, int], PartitionBatch] = {}
        submitted: list[tuple[tuple[str, int], PartitionBatch, asyncio.Future[Any]]] = []
        stalled: set[tuple[str, int]] = set()  # partitions whose batch the producer refused

        async def submit(tp: tuple[str, int], batch: PartitionBatch) -> None:
            try:
                future = await producer.send_batch(batch.builder, tp[0], partition=tp[1])
            except KafkaError as exc:  # e.g. its queue stayed full: the broker takes nothing
                stalled.add(tp)
                self._failed(outcome, batch.rows, exc)
            else:
                submitted.append((tp, batch, future))
                if tp in self._single:  # one row a round until one goes through
                    stalled.add(tp)

        for row in rows:
            partitions = resolved.ready.get(row.topic)
            if partitions is None:  # it waits; it spends a try only if the broker refused it
                outcome.waiting += 1
                if row.topic in resolved.refused:
                    outcome.refused.append((row, resolved.refused[row.topic]))
                continue
            if message_size(row) > MAX_MESSAGE_BYTES:  # refused for good: it becomes a dead letter
                outcome.too_large.append(row)
                continue
            tp = (row.topic, self._target(row, partitions))
            if tp in stalled:  # later rows of its keys must not overtake the refused ones
                outcome.waiting += 1
                continue
            batch = open_batches.get(tp)
            if batch is None or not batch.add(row):
                if batch is not None:
                    del open_batches[tp]
                    await submit(tp, batch)
                    if tp in stalled:
                        outcome.waiting += 1
                        continue
                batch = open_batches[tp] = PartitionBatch(producer.create_batch())
                if not batch.add(row):  # an empty batch takes any row; never lose one if not
                    del open_batches[tp]
                    outcome.too_large.append(row)
                    continue
            if tp in self._single:
                del open_batches[tp]
                await submit(tp, batch)
        for tp, batch in open_batches.items():
            if tp not in stalled:
                await submit(tp, batch)
            else:
                outcome.waiting += len(batch.rows)
        for tp, batch, future in submitted:
            await self._settle(outcome, tp, batch, future)
        outcome.acked_at = time.monotonic()
        outcome.acked.sort(key=lambda row: row.id)
        return outcome

    async def _settle(
        self, outcome: Outcome, tp: tuple[str, int], batch: PartitionBatch, future: Any
    ) -> None:
        """Sort one batch by its ack: acked, or failed (and, when refused for good, why)."""
        try:
            await future
        except KafkaError as exc:
            self._failed(outcome, batch.rows, exc)
            if definite(exc):  # a time-out is no answer, never a refusal
                if len(batch.rows) == 1:
                    outcome.refused.append((batch.rows[0], exc))
                else:  # which row? send them one at a time to find out
                    self._single.add(tp)
        else:
            outcome.acked.extend(batch.rows)
            self._single.discard(tp)

    def _target(self, row: UnsentRow, partitions: list[int]) -> int:
        """The partition ``row`` goes to: the one it asks for, else its key's. A partition the
        topic does not have (a reply partition chosen for a topic since recreated smaller) is
        no reason to lose the row: it goes to its key's partition, with a warning."""
        if row.partition is None:
            return self._partition(row.key, partitions)
        if row.partition in partitions:
            return row.partition
        metrics.ERRORS.labels("partition").inc()
        log.warning(
            "outbox_partition_missing",
            outbox_id=row.id,
            topic=row.topic,
            partition=row.partition,
            partitions=len(partitions),
        )
        return self._partition(row.key, partitions)

    def _partition(self, key: bytes | None, partitions: list[int]) -> int:
        """The partition of ``key`` (remembered: hashing in Python costs more than a lookup)."""
        if key is None:
            return int(_PARTITIONER(None, partitions, partitions))
        cached = self._partitions.get((key, len(partitions)))
        if cached is None:
            if len(self._partitions) >= PARTITION_CACHE_SIZE:
                self._partitions.clear()
            cached = self._partitions[(key, len(partitions))] = _PARTITIONER(
                key, partitions, partitions
            )
        return cached

    def _failed(self, outcome: Outcome, rows: Sequence[UnsentRow], exc: BaseException) -> None:
        """Rows the broker did not take: they stay in the table; the producer is rebuilt."""
        outcome.failed.extend(rows)
        self._producer_broken = True  # its sequence numbers refuse the rest of the partition
        metrics.ERRORS.labels("send").inc(len(rows))
        log.warning(
            "outbox_publish_failed",
            outbox_id=rows[0].id,
            rows=len(rows),
            topic=rows[0].topic,
            shard=sorted({row.shard for row in rows}),
            error_class=_name(exc),
            error=str(exc),
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
        if self._session is not None:
            await discard(self._session)
            self._session = None

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None and self._producer_broken:
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
            self._producer_broken = False
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

    async def close(self) -> None:
        """Close the producer, then the session (which releases the shard locks)."""
        await self._drop_producer()
        await self._drop_session(closing=True)
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
            await unlock_shards(session, extra)
            self._set_owned(self.owned - set(extra))
            log.info("outbox_shards_released", shards=extra, relays=relays, target=target)
            return
        if len(self.owned) == target:
            return
        owners = await shard_owners(session)
        held = {shard for shard, pid in owners.items() if pid == self._session_pid}
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

    def _set_owned(self, shards: set[int]) -> None:
        metrics.SHARDS_OWNED.inc(len(shards) - len(self.owned))
        self.owned = set(shards)

    async def _refresh_backlog(self, session: AsyncConnection) -> None:
        stats = await backlog(session)
        metrics.BACKLOG_ROWS.set(stats.rows)
        metrics.OLDEST_AGE.set(stats.oldest_age_seconds)


def _name(exc: BaseException) -> str:
    return type(exc).__name__
