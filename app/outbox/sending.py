"""A relay round's rows on their way to the broker: producer batches per partition, in id order.

Rounds overlap (the relay reads and sends the next while the acks of earlier ones are pending), so
a partition's batches of one round are handed to the producer only once the rounds still in
flight before it have settled that partition, and only if every one of their rows of it was acked.
A row that failed, or was held back, is read again by a round started after its own round ended,
before any later row of its partition: so nothing of a key overtakes a row of the key that did not
go, whatever the producer does with batches queued behind a failed one. A topic with rows that
could not be sent (its partitions unknown) holds its rows in later rounds in flight the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy.ext.asyncio import AsyncConnection

from app.outbox import metrics
from app.outbox.refusals import definite
from app.outbox.relay_rounds import Outcome, PartitionBatch, message_size
from app.outbox.topics import Resolved
from app.store.outbox import UnsentRow

log = structlog.get_logger()

Partition = tuple[str, int]  # (topic, partition)

# the producer's max_request_size: a bigger row can never be published, and is dead-lettered
MAX_MESSAGE_BYTES = 1_048_576
# the key -> partition mapping every Kafka client uses by default (murmur2), so the relay's
# batches land where a plain producer's messages of the same key would
_PARTITIONER = DefaultPartitioner()
PARTITION_CACHE_SIZE = 100_000


@dataclass(slots=True)
class _Plan:
    """One partition's rows of a round: its producer batches, and how many rows it holds back."""

    batches: list[PartitionBatch] = field(default_factory=list)
    held: int = 0


@dataclass(slots=True)
class Sending:
    """One round's rows in flight. Each partition's future settles True once every row of the
    round for it was acked, False if one failed or was held back."""

    outcome: Outcome
    partitions: dict[Partition, asyncio.Future[bool]]
    held_topics: set[str]  # topics with rows this round could not send
    task: asyncio.Future[Any] | None = None

    @property
    def holds(self) -> bool:
        """Whether the round holds rows back (read but not sent) so far."""
        return self.outcome.waiting > 0

    async def settled(self) -> Outcome:
        """The round's outcome once every partition settled (acked rows in id order)."""
        try:
            if self.task is not None:
                await self.task
        finally:
            for future in self.partitions.values():  # a cancelled round holds later ones back
                if not future.done():
                    future.set_result(False)
        self.outcome.acked_at = time.monotonic()
        self.outcome.acked.sort(key=lambda row: row.id)
        return self.outcome


@dataclass(slots=True)
class InFlight:
    """A round read and being sent: its rows stay out of later reads until it ends."""

    session: AsyncConnection  # the session that read them (and owns their shards)
    shards: tuple[int, ...]
    rows: list[UnsentRow]
    fetched_at: float
    full: bool  # some shard had a full batch: more rows are likely waiting
    sending: Sending | None = None


class Sender:
    """Sends rounds through one producer; remembers partitions of keys and refused partitions."""

    def __init__(self) -> None:
        self.broken = False  # a send failed: the producer's sequence numbers refuse the rest
        self._partitions: dict[tuple[bytes, int], int] = {}
        self._single: set[Partition] = set()  # refused batch: one row a round till one goes

    def start(
        self,
        producer: AIOKafkaProducer,
        rows: Sequence[UnsentRow],
        resolved: Resolved,
        earlier: Sequence[Sending] = (),
    ) -> Sending:
        """Batch ``rows`` per partition and start sending them after the ``earlier`` rounds
        still in flight (oldest first) settle their partitions."""
        outcome = Outcome()
        held_before = set().union(*(sending.held_topics for sending in earlier))
        plans: dict[Partition, _Plan] = {}
        held_topics: set[str] = set()
        for row in rows:
            partitions = resolved.ready.get(row.topic)
            if partitions is None or row.topic in held_before:
                # it waits; it spends a try only if the broker refused its topic
                outcome.waiting += 1
                held_topics.add(row.topic)
                if partitions is None and row.topic in resolved.refused:
                    outcome.refused.append((row, resolved.refused[row.topic]))
                continue
            if message_size(row) > MAX_MESSAGE_BYTES:  # refused for good: it becomes a dead letter
                outcome.too_large.append(row)
                continue
            tp = (row.topic, self._target(row, partitions))
            plan = plans.setdefault(tp, _Plan())
            if plan.held or (tp in self._single and plan.batches):
                plan.held += 1  # one row a round until one goes through
                outcome.waiting += 1
                continue
            if not plan.batches or not plan.batches[-1].add(row):
                batch = PartitionBatch(producer.create_batch())
                if not batch.add(row):  # an empty batch takes any row; never lose one if not
                    outcome.too_large.append(row)
                    continue
                plan.batches.append(batch)
        tails: dict[Partition, asyncio.Future[bool]] = {}
        for sending in earlier:  # the latest round in flight before this one, per partition
            tails.update(sending.partitions)
        loop = asyncio.get_running_loop()
        sending = Sending(outcome, {tp: loop.create_future() for tp in plans}, held_topics)
        if plans:
            sending.task = asyncio.gather(
                *(
                    self._send_partition(
                        producer, tp, plan, tails.get(tp), sending.partitions[tp], outcome
                    )
                    for tp, plan in plans.items()
                )
            )
        return sending

    async def _send_partition(
        self,
        producer: AIOKafkaProducer,
        tp: Partition,
        plan: _Plan,
        tail: asyncio.Future[bool] | None,
        settled: asyncio.Future[bool],
        outcome: Outcome,
    ) -> None:
        """Send one partition's batches once the earlier round's settle; sort them by their ack."""
        ok = plan.held == 0
        try:
            if tail is not None:
                await asyncio.wait({tail})  # not awaited directly: a cancel must not cancel it
                if not tail.result():  # an earlier row of this partition did not go
                    outcome.waiting += sum(len(batch.rows) for batch in plan.batches)
                    ok = False
                    return
            submitted: list[tuple[PartitionBatch, asyncio.Future[Any]]] = []
            for n, batch in enumerate(plan.batches):
                try:
                    future = await producer.send_batch(batch.builder, tp[0], partition=tp[1])
                except KafkaError as exc:  # e.g. its queue stayed full: the broker takes nothing
                    self._failed(outcome, batch.rows, exc)
                    outcome.waiting += sum(len(later.rows) for later in plan.batches[n + 1 :])
                    ok = False
                    break
                submitted.append((batch, future))
            for batch, future in submitted:
                ok = await self._settle(outcome, tp, batch, future) and ok
        finally:
            if not settled.done():
                settled.set_result(ok)

    async def _settle(
        self, outcome: Outcome, tp: Partition, batch: PartitionBatch, future: Any
    ) -> bool:
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
            return False
        outcome.acked.extend(batch.rows)
        self._single.discard(tp)
        return True

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
        self.broken = True
        metrics.ERRORS.labels("send").inc(len(rows))
        log.warning(
            "outbox_publish_failed",
            outbox_id=rows[0].id,
            rows=len(rows),
            topic=rows[0].topic,
            shard=sorted({row.shard for row in rows}),
            error_class=type(exc).__name__,
            error=str(exc),
        )
