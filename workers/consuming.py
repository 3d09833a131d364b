"""Consuming a topic in a consumer group, as the claim and handoff workers do.

Every record read gets exactly one outcome. Each consumer (an ``AIOKafkaConsumer``) takes its
records in fetched batches (``getmany``: it returns as soon as records are there and waits only
when there are none, so a lone record is not held back) and hands each over in order, with no
framework between the fetch and the handler. The record's bytes reach the handler untouched: no
step decodes a header value, so none can drop a record whose headers are not UTF-8 or whose key
or value is null; a header name that is not UTF-8, which aiokafka itself cannot decode, is read
with its bytes kept (``workers.lenient_records``), so the handler refuses it and the consumer
reads on.

``pipelined``: a consumer hands each record over (``Submit``) and reads the next without waiting
for its outcome, up to a bound of records in flight (then it waits: backpressure). The handler is
told when a record's outcome is final, in any order; ``OffsetCommits`` commits each partition only
up to its first record not final (``workers.pipeline.Positions``), so a record handed over is
never lost: a crash, or a partition moving to another consumer, reads again every record not
final (and those after it), and the handlers' own idempotence answers them.

Several consumers of the group may run in one process, each on its own partitions, each handing
its records over in order.

Offsets are committed in the background: a record's outcome does not wait for the broker to
confirm the commit, which costs a group-coordinator write (5 ms or more on Kafka 4 brokers, whose
coordinator lingers to batch writes). A record that could not be handed over (the handler raised
before it did) is not registered: the consumer seeks back to it, and nothing after it was taken.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

from app.health import RECORDS_PER_FETCH, consumer_assigned
from app.kafka import client_options
from app.kafka_headers import Header
from app.settings import Settings
from workers import lenient_records
from workers.pipeline import Positions

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()

COMMIT_INTERVAL_SECONDS = 0.05  # how long done offsets wait, so that one commit carries many
COMMIT_TIMEOUT_SECONDS = 10.0  # a commit the broker does not answer in this time is given up
SETTLE_SECONDS = 10.0  # how long records in flight may finish before their partition is given up
# an idle consumer's fetch returns empty after this long and is asked again; records that arrive
# meanwhile return it at once
FETCH_WAIT_MS = 1_000
FETCH_RETRY_SECONDS = 5.0  # a fetch that failed (the broker away) is tried again after this long
HAND_OVER_RETRY_SECONDS = 1.0  # a record whose handing over raised is read again after this long


@dataclass(frozen=True)
class Incoming:
    """A record as read from Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None  # None: a null value (a tombstone), kept as such in its dead letter
    headers: list[Header] = field(default_factory=list)


# hands a record over, waiting only for room; calls its second argument once the outcome is final
Submit = Callable[[Incoming, Callable[[], None]], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    """What a worker consumes: a topic, in a consumer group, with this many consumers."""

    topic: str
    group: str
    consumers: int = 1


def incoming(record: ConsumerRecord[bytes, bytes]) -> Incoming:
    return Incoming(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value,
        headers=list(record.headers or ()),
    )


class Ticket:
    """A record handed over: ``finish`` it once its outcome is final (only the first call counts)."""

    __slots__ = ("_commits", "_positions", "offset", "open")

    def __init__(self, commits: OffsetCommits, positions: Positions, offset: int) -> None:
        self._commits = commits
        self._positions = positions
        self.offset = offset
        self.open = True

    def finish(self) -> None:
        if self.open:
            self.open = False
            self._positions.finish(self.offset)
            self._commits.closed_one()

    def forget(self) -> None:
        """The record was not handed over after all: it is read again, nothing is committed."""
        if self.open:
            self.open = False
            self._positions.forget(self.offset)
            self._commits.closed_one()


class OffsetCommits:
    """The records in flight of each partition, and their offsets committed in the background.

    ``take`` registers a record before it is handed over (waiting while ``max_in_flight`` have no
    final outcome yet: backpressure); its ticket's ``finish`` marks its outcome final, in any order. A
    partition is committed up to its first record not finished (``workers.pipeline.Positions``),
    every ``COMMIT_INTERVAL_SECONDS`` while records finish; ``flush`` commits now. Before
    partitions are revoked, and when the worker stops, the records in flight are given up to
    ``settle_seconds`` to finish, then what is done is committed; the rest is read again by the
    next owner. Commits are serialized, so a committed offset never goes back.
    """

    def __init__(
        self,
        max_in_flight: int = 1,
        interval: float = COMMIT_INTERVAL_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.interval = interval
        self.settle_seconds = settle_seconds
        self._positions: dict[AIOKafkaConsumer, dict[TopicPartition, Positions]] = {}
        self._wake = asyncio.Event()  # something finished: a commit may move
        self._moved = asyncio.Event()  # something finished or was forgotten: room, or settled
        self._lock = asyncio.Lock()
        self._closed = False
        self._open = 0  # records handed over whose outcome is not final yet
        # revocations of each consumer's partitions so far: a record read before one is not taken
        # after it. By consumer: a consumer of this process that was thrown out of the group
        # learns it late and gives up a partition another one of ours may own by then
        self._revocations: Counter[tuple[AIOKafkaConsumer, TopicPartition]] = Counter()

    @property
    def open(self) -> int:
        return self._open

    def in_flight(
        self, only: set[TopicPartition] | None = None, consumer: AIOKafkaConsumer | None = None
    ) -> int:
        """Records not committed yet (of ``only``, of ``consumer``): those not final and those
        after them."""
        return sum(
            len(positions)
            for owner, partitions in self._positions.items()
            if consumer is None or owner is consumer
            for tp, positions in partitions.items()
            if only is None or tp in only
        )

    def revocations(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
        """How often ``consumer`` gave ``tp`` up so far: a record it read now is taken only while
        this holds."""
        return self._revocations[consumer, tp]

    def listener(self, consumer: AIOKafkaConsumer) -> ConsumerRebalanceListener:
        """The rebalance listener of ``consumer``: what it gives up is its own alone."""
        return _Revocations(self, consumer)

    async def take(
        self, consumer: AIOKafkaConsumer, record: Incoming, read_at: int | None = None
    ) -> Ticket | None:
        """Register ``record`` as in flight once there is room; None when it must not be handed
        over (its partition was revoked since it was read, or the worker stops): it is read again.

        ``read_at``: the partition's ``revocations`` when the record was fetched (by default:
        now). A partition revoked since may have come straight back: its consumer reads again
        from the committed offset, and the records still in flight from before are no longer
        counted, so this record would let its new commits pass them.
        """
        tp = TopicPartition(record.topic, record.partition)
        revocations = self._revocations[consumer, tp] if read_at is None else read_at
        while not self._closed and self._open >= self.max_in_flight:
            self._moved.clear()
            await self._moved.wait()
        if self._closed:
            await asyncio.Future()  # taking no more: wait here until the consumer stops
        if self._revocations[consumer, tp] != revocations or tp not in consumer.assignment():
            return None
        positions = self._positions.setdefault(consumer, {}).setdefault(tp, Positions())
        positions.take(record.offset)
        self._open += 1
        return Ticket(self, positions, record.offset)

    def closed_one(self) -> None:
        self._open -= 1
        self.moved()

    def moved(self) -> None:
        self._wake.set()
        self._moved.set()

    def close(self) -> None:
        """Take no more records: a handler waiting for room, or arriving, waits for the end."""
        self._closed = True
        self._moved.set()

    async def settle(
        self, only: set[TopicPartition] | None = None, consumer: AIOKafkaConsumer | None = None
    ) -> bool:
        """Wait up to ``settle_seconds`` for the records in flight (of ``only``, of ``consumer``)
        to finish; whether they did."""
        try:
            async with asyncio.timeout(self.settle_seconds):
                while self.in_flight(only, consumer):
                    self._moved.clear()
                    await self._moved.wait()
        except TimeoutError:
            log.warning("records_still_in_flight", records=self.in_flight(only, consumer))
            return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Commit what is done, at most every ``interval``, until ``stop`` is set."""
        while not stop.is_set():
            waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            await asyncio.sleep(self.interval)  # lets more records join this commit
            await self.flush()

    async def flush(
        self, only: set[TopicPartition] | None = None, consumer: AIOKafkaConsumer | None = None
    ) -> None:
        """Commit the partitions (the ``only`` ones, of ``consumer``, when given) up to their
        first record in flight, now."""
        async with self._lock:
            self._wake.clear()
            for owner, partitions in list(self._positions.items()):
                if consumer is not None and owner is not consumer:
                    continue
                chosen = {
                    tp: positions
                    for tp, positions in partitions.items()
                    if (only is None or tp in only) and positions.to_commit() is not None
                }
                if chosen:
                    await self._commit(owner, chosen)

    async def _commit(
        self, consumer: AIOKafkaConsumer, chosen: dict[TopicPartition, Positions]
    ) -> None:
        assigned = consumer.assignment()
        mine = {tp: positions for tp, positions in chosen.items() if tp in assigned}
        offsets = {tp: positions.to_commit() for tp, positions in mine.items()}
        try:
            if offsets:
                await asyncio.wait_for(consumer.commit(offsets), COMMIT_TIMEOUT_SECONDS)
        except (KafkaError, TimeoutError) as exc:
            # the partitions moved to another consumer (or the broker is away): their new owner
            # reads these records again and answers them as before
            log.warning(
                "offset_commit_failed", error_class=type(exc).__name__, partitions=len(mine)
            )
            return
        for tp, positions in mine.items():
            offset = offsets[tp]
            assert offset is not None
            positions.committed(offset)

    async def revoked(self, consumer: AIOKafkaConsumer, revoked: set[TopicPartition]) -> None:
        """Let the records in flight of the partitions ``consumer`` gives up finish (for a
        while), commit what is done, and forget the rest: the next owner reads it again."""
        only = set(revoked)
        # a record it read before, waiting for room or later in its batch, is read again
        self._revocations.update((consumer, tp) for tp in only)
        await self.settle(only, consumer)
        await self.flush(only, consumer)
        partitions = self._positions.get(consumer, {})
        for tp in only:
            partitions.pop(tp, None)
        self.moved()


class _Revocations(ConsumerRebalanceListener):
    """One consumer's rebalance listener: what it gives up, ``OffsetCommits.revoked`` settles."""

    def __init__(self, commits: OffsetCommits, consumer: AIOKafkaConsumer) -> None:
        self._commits = commits
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._commits.revoked(self._consumer, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


def consumer_options(settings: Settings, subscription: Subscription) -> dict[str, Any]:
    """What each consumer of ``subscription`` is built with: the connection and security
    options every client has (``app.kafka.client_options``), the group, and manual commits."""
    return {
        **client_options(settings),
        "group_id": subscription.group,
        "client_id": f"quartermaster-{subscription.group}",
        "enable_auto_commit": False,  # OffsetCommits commits; a record not handed over is sought
        "auto_offset_reset": "earliest",
        "max_poll_interval_ms": 600_000,
        "session_timeout_ms": settings.consumer_session_timeout_ms,
        # a consumer giving partitions up first lets their records in flight finish (up to
        # SETTLE_SECONDS): the group waits that long for it to rejoin, so it is not kicked out
        "rebalance_timeout_ms": settings.consumer_session_timeout_ms + int(SETTLE_SECONDS * 1000),
        "heartbeat_interval_ms": max(settings.consumer_session_timeout_ms // 5, 100),
    }


async def read(
    consumer: AIOKafkaConsumer, group: str, commits: OffsetCommits, submit: Submit
) -> None:
    """Read ``consumer``'s records in fetched batches and hand each over, in order, until the
    consumer stops."""
    sizes = RECORDS_PER_FETCH.labels(group)
    while True:
        try:
            fetched = await consumer.getmany(
                timeout_ms=FETCH_WAIT_MS, max_records=commits.max_in_flight
            )
        except ConsumerStoppedError:
            return
        except Exception as exc:  # noqa: BLE001 - the broker away, a record it cannot read ...
            log.warning("fetch_failed", group=group, error_class=type(exc).__name__)
            await asyncio.sleep(FETCH_RETRY_SECONDS)
            continue
        if not fetched:
            continue
        sizes.observe(sum(len(records) for records in fetched.values()))
        # before anything is handed over: a revocation from here on makes these records stale
        read_at = {tp: commits.revocations(consumer, tp) for tp in fetched}
        for tp, records in fetched.items():
            if not await hand_over(consumer, commits, submit, records, read_at[tp]):
                await asyncio.sleep(HAND_OVER_RETRY_SECONDS)  # not at full speed for ever


async def hand_over(
    consumer: AIOKafkaConsumer,
    commits: OffsetCommits,
    submit: Submit,
    records: list[ConsumerRecord[bytes, bytes]],
    read_at: int,
) -> bool:
    """Hand over ``records`` (of one partition, in order) until one cannot be; whether none
    raised. When one raises, the consumer seeks back to it: it and those after it are read
    again, and nothing after it is committed before it is handled."""
    for record in records:
        item = incoming(record)
        ticket = None
        try:
            ticket = await commits.take(consumer, item, read_at)
            if ticket is None:
                return True  # its partition moved on: its next owner reads it and those after it
            await submit(item, ticket.finish)
        except BaseException as exc:
            if ticket is not None:
                ticket.forget()
            tp = TopicPartition(record.topic, record.partition)
            if tp in consumer.assignment() and commits.revocations(consumer, tp) == read_at:
                consumer.seek(tp, record.offset)  # not if it was given up meanwhile
            if not isinstance(exc, Exception):
                raise
            log.error(
                "record_not_handed_over",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error_class=type(exc).__name__,
            )
            return False
    return True


@contextlib.asynccontextmanager
async def pipelined(
    wiring: Wiring, subscription: Subscription, submit: Submit, max_in_flight: int
) -> AsyncIterator[None]:
    """Consume ``subscription`` with ``submit``, up to ``max_in_flight`` records in flight, while
    the block runs. On leaving it: take no more records, give those in flight time to finish,
    commit what is done and stop the consumers."""
    lenient_records.install()  # a header name that is not UTF-8 reaches the handler
    commits = OffsetCommits(max_in_flight)
    options = consumer_options(wiring.settings, subscription)
    consumers = [AIOKafkaConsumer(**options) for _ in range(subscription.consumers)]
    for consumer in consumers:
        consumer.subscribe([subscription.topic], listener=commits.listener(consumer))
    wiring.needs_kafka()
    wiring.health.check("consumer_assigned", consumer_assigned(lambda: consumers))
    try:
        # together, so that the group's first rebalance spreads the partitions over all of them
        await asyncio.gather(*(consumer.start() for consumer in consumers))
    except BaseException:  # refused at start (credentials, certificate): close what it opened
        await _stopped(consumers)
        raise
    readers = [
        asyncio.create_task(
            read(consumer, subscription.group, commits, submit),
            name=f"consumer:{subscription.group}:{n}",
        )
        for n, consumer in enumerate(consumers)
    ]
    for reader in readers:
        reader.add_done_callback(partial(_ended, wiring.stop))
    committer = asyncio.create_task(
        commits.run(wiring.stop), name=f"offset-commits:{subscription.group}"
    )
    try:
        yield
    finally:
        commits.close()
        await _cancelled([*readers])
        await commits.settle()
        await _cancelled([committer])
        await commits.flush()
        await _stopped(consumers)
        if failed := next((r.exception() for r in readers if not r.cancelled()), None):
            raise failed  # the process ends as failed, for its supervisor to restart it


def _ended(stop: asyncio.Event, reader: asyncio.Task[None]) -> None:
    """A consumer's reader that failed stops the process: a consumer that reads no more would
    keep its partitions (it still heartbeats) and nobody would read them."""
    if not reader.cancelled() and (error := reader.exception()) is not None:
        log.error("consumer_failed", task=reader.get_name(), error_class=type(error).__name__)
        stop.set()


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stopped(consumers: list[AIOKafkaConsumer]) -> None:
    """Stop ``consumers`` (they leave the group); a failing stop does not stop the others."""
    for outcome in await asyncio.gather(*(c.stop() for c in consumers), return_exceptions=True):
        if isinstance(outcome, BaseException):
            log.warning("consumer_stop_failed", error_class=type(outcome).__name__)
