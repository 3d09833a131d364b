"""Consuming a topic in a consumer group, as the claim and handoff workers do.

Every record read gets exactly one outcome. The record's bytes reach the handler untouched
(``parse_raw``): no framework step decodes a header, so none can drop a record whose headers are
not UTF-8 or whose key or value is null; a header name that is not UTF-8, which aiokafka itself
cannot decode, is read with its bytes kept (``workers.lenient_records``), so the handler refuses
it and the consumer reads on.

``pipelined``: a consumer hands each record over (``Submit``) and reads the next without waiting
for its outcome, up to a bound of records in flight (then it waits: backpressure). The handler is
told when a record's outcome is final, in any order; ``OffsetCommits`` commits each partition only
up to its first record not final (``workers.pipeline.Positions``), so a record handed over is
never lost: a crash, or a partition moving to another consumer, reads again every record not
final (and those after it), and the handlers' own idempotence answers them. ``consuming``: one
record at a time per consumer (each is final when its handler returned).

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
import copy
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage
from faststream.message import StreamMessage

from app.health import consumer_assigned
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


Handle = Callable[[Incoming], Awaitable[object]]
# hands a record over, waiting only for room; calls its second argument once the outcome is final
Submit = Callable[[Incoming, Callable[[], None]], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    """What a worker consumes: a topic, in a consumer group, with this many consumers."""

    topic: str
    group: str
    consumers: int = 1


async def parse_raw(
    record: ConsumerRecord[bytes, bytes],
    default_parser: Callable[[ConsumerRecord[bytes, bytes]], Awaitable[StreamMessage[Any]]],
) -> StreamMessage[Any]:
    """Parser that leaves the record's bytes alone: FastStream's own decodes every header value
    as UTF-8 and fails on a value that is not (or that is null), and then the record would get
    no outcome at all. Its message is built from a copy without headers; the handler reads the
    untouched record (``raw_message``)."""
    bare = copy.copy(record)  # keeps the consumer FastStream set on it, when it did
    bare.headers = []
    message = await default_parser(bare)
    message.raw_message = record
    return message


async def as_message(message: StreamMessage[Any]) -> StreamMessage[Any]:
    """Decoder that hands the handler the message itself: parsing is ours, so bad input is
    classified, and the broker runs without dependency injection (which would resolve the
    message's context in a thread for every record)."""
    return message


def incoming(message: KafkaMessage) -> Incoming:
    record = message.raw_message
    assert not isinstance(record, tuple)
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


class OffsetCommits(ConsumerRebalanceListener):
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
        # revocations of each partition so far: a record read before one is not taken after it
        self._revocations: Counter[TopicPartition] = Counter()

    @property
    def open(self) -> int:
        return self._open

    def in_flight(self, only: set[TopicPartition] | None = None) -> int:
        """Records not committed yet (of ``only``): those not final and those after them."""
        return sum(
            len(positions)
            for partitions in self._positions.values()
            for tp, positions in partitions.items()
            if only is None or tp in only
        )

    async def take(self, consumer: AIOKafkaConsumer, record: Incoming) -> Ticket | None:
        """Register ``record`` as in flight once there is room; None when it must not be handed
        over (its partition was revoked meanwhile, or the worker stops): it is read again.

        A partition revoked while the record waited for room may have come straight back: its
        consumer reads again from the committed offset, and the records still in flight from
        before are no longer counted, so this record would let its new commits pass them.
        """
        tp = TopicPartition(record.topic, record.partition)
        revocations = self._revocations[tp]
        while not self._closed and self._open >= self.max_in_flight:
            self._moved.clear()
            await self._moved.wait()
        if self._closed:
            await asyncio.Future()  # taking no more: wait here until the broker stops
        if self._revocations[tp] != revocations or tp not in consumer.assignment():
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

    async def settle(self, only: set[TopicPartition] | None = None) -> bool:
        """Wait up to ``settle_seconds`` for the records in flight (of ``only``) to finish;
        whether they did."""
        try:
            async with asyncio.timeout(self.settle_seconds):
                while self.in_flight(only):
                    self._moved.clear()
                    await self._moved.wait()
        except TimeoutError:
            log.warning("records_still_in_flight", records=self.in_flight(only))
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

    async def flush(self, only: set[TopicPartition] | None = None) -> None:
        """Commit the partitions (the ``only`` ones, when given) up to their first record in
        flight, now."""
        async with self._lock:
            self._wake.clear()
            for consumer, partitions in list(self._positions.items()):
                chosen = {
                    tp: positions
                    for tp, positions in partitions.items()
                    if (only is None or tp in only) and positions.to_commit() is not None
                }
                if chosen:
                    await self._commit(consumer, chosen)

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

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the records in flight of the partitions this consumer gives up finish (for a
        while), commit what is done, and forget the rest: the next owner reads it again."""
        only = set(revoked)
        self._revocations.update(only)  # a record waiting for room is read again, not taken
        await self.settle(only)
        await self.flush(only=only)
        for partitions in self._positions.values():
            for tp in only:
                partitions.pop(tp, None)
        self.moved()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


def one_at_a_time(handle: Handle) -> Submit:
    """Hand records to ``handle`` one at a time: each is final once ``handle`` returned."""

    async def submit(record: Incoming, finished: Callable[[], None]) -> None:
        await handle(record)
        finished()

    return submit


def subscribe(
    broker: KafkaBroker,
    settings: Settings,
    subscription: Subscription,
    submit: Submit,
    commits: OffsetCommits,
) -> Any:
    """Subscribe ``submit`` to the subscription's topic on ``broker``; return the subscriber."""
    extra: dict[str, Any] = (
        {"max_workers": subscription.consumers} if subscription.consumers > 1 else {}
    )
    subscriber = broker.subscriber(
        subscription.topic,
        group_id=subscription.group,
        ack_policy=AckPolicy.MANUAL,  # OffsetCommits commits; on_record seeks back on failure
        auto_offset_reset="earliest",
        parser=parse_raw,
        decoder=as_message,
        no_reply=True,  # what a handler publishes goes through the outbox
        max_poll_interval_ms=600_000,
        session_timeout_ms=settings.consumer_session_timeout_ms,
        # a consumer giving partitions up first lets their records in flight finish (up to
        # SETTLE_SECONDS): the group waits that long for it to rejoin, so it is not kicked out
        rebalance_timeout_ms=settings.consumer_session_timeout_ms + int(SETTLE_SECONDS * 1000),
        heartbeat_interval_ms=max(settings.consumer_session_timeout_ms // 5, 100),
        listener=commits,
        **extra,
    )

    @subscriber
    async def on_record(message: KafkaMessage) -> None:
        record = incoming(message)
        consumer = message.consumer
        assert isinstance(consumer, AIOKafkaConsumer)
        ticket = None
        try:
            ticket = await commits.take(consumer, record)
            if ticket is None:
                return  # its partition moved on: its next owner reads it
            await submit(record, ticket.finish)
        except BaseException:
            # not handed over: the consumer goes back to this record, and nothing after it is
            # committed before it is handled
            if ticket is not None:
                ticket.forget()
            await message.nack()
            raise

    return subscriber


@contextlib.asynccontextmanager
async def consuming(
    wiring: Wiring, subscription: Subscription, handle: Handle
) -> AsyncIterator[None]:
    """Consume ``subscription`` with ``handle``, one record at a time per consumer, while the
    block runs; on leaving it, commit what is done and stop the broker."""
    async with pipelined(
        wiring, subscription, one_at_a_time(handle), max_in_flight=subscription.consumers
    ):
        yield


@contextlib.asynccontextmanager
async def pipelined(
    wiring: Wiring, subscription: Subscription, submit: Submit, max_in_flight: int
) -> AsyncIterator[None]:
    """Consume ``subscription`` with ``submit``, up to ``max_in_flight`` records in flight, while
    the block runs. On leaving it: take no more records, give those in flight time to finish,
    commit what is done and stop the broker."""
    lenient_records.install()  # a header name that is not UTF-8 reaches the handler
    commits = OffsetCommits(max_in_flight)
    broker = wiring.broker()
    subscriber = subscribe(broker, wiring.settings, subscription, submit, commits)
    wiring.health.check("consumer_assigned", consumer_assigned(subscriber))
    try:
        await broker.start()
    except BaseException:  # refused at start (credentials, certificate): close what it opened
        await broker.stop()
        raise
    committer = asyncio.create_task(
        commits.run(wiring.stop), name=f"offset-commits:{subscription.group}"
    )
    try:
        yield
    finally:
        commits.close()
        await commits.settle()
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await commits.flush()
        await broker.stop()
