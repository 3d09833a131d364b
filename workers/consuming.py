"""Consuming a topic in a consumer group, as the claim and handoff workers do.

Every record read gets exactly one outcome. The record's bytes reach the handler untouched
(``parse_raw``): no framework step decodes a header, so none can drop a record whose headers are
not UTF-8 or whose key or value is null. Its offset is committed only after the handler returned
(a handler interrupted before it finished is not acknowledged and the record is read again).

Several consumers of the group may run in one process, each on its own partitions, each handling
its records in order.

Offsets are committed in the background (``OffsetCommits``): a handler marks its record done and
takes the next one at once instead of waiting for the broker to confirm the commit, which costs a
group-coordinator write (5 ms or more on Kafka 4 brokers, whose coordinator lingers to batch
writes) and would double the time each record holds its partition. Only offsets of records whose
handler returned are ever committed. A crash before the commit means the records done since the
last commit are read again (and the handlers' own idempotence answers them as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage
from faststream.message import StreamMessage

from app.dlt.headers import Header
from app.settings import Settings
from app.wiring import Wiring, consumer_assigned

log = structlog.get_logger()

COMMIT_INTERVAL_SECONDS = 0.05  # how long done offsets wait, so that one commit carries many
COMMIT_TIMEOUT_SECONDS = 10.0  # a commit the broker does not answer in this time is given up


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


class OffsetCommits(ConsumerRebalanceListener):
    """The next offset of each partition whose records are done, committed in the background.

    ``done`` records a processed record; ``run`` commits what is done every
    ``COMMIT_INTERVAL_SECONDS`` while records come in; ``flush`` commits now (before partitions
    are revoked, and when the worker stops). Commits are serialized, so a committed offset never
    goes back.
    """

    def __init__(self, interval: float = COMMIT_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._done: dict[AIOKafkaConsumer, dict[TopicPartition, int]] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def done(self, consumer: AIOKafkaConsumer, topic: str, partition: int, offset: int) -> None:
        """A record's handler returned: its partition may be committed past it."""
        self._done.setdefault(consumer, {})[TopicPartition(topic, partition)] = offset + 1
        self._wake.set()

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
        """Commit the done offsets (of the ``only`` partitions, when given) now."""
        async with self._lock:
            self._wake.clear()
            taken: dict[AIOKafkaConsumer, dict[TopicPartition, int]] = {}
            for consumer, offsets in self._done.items():
                chosen = {tp: o for tp, o in offsets.items() if only is None or tp in only}
                for tp in chosen:
                    del offsets[tp]
                if chosen:
                    taken[consumer] = chosen
            for consumer, offsets in taken.items():
                await self._commit(consumer, offsets)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        assigned = consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        try:
            if mine:
                await asyncio.wait_for(consumer.commit(mine), COMMIT_TIMEOUT_SECONDS)
        except (KafkaError, TimeoutError) as exc:
            # the partitions moved to another consumer (or the broker is away): their new owner
            # reads these records again and answers them as before
            log.warning(
                "offset_commit_failed", error_class=type(exc).__name__, partitions=len(mine)
            )
        except asyncio.CancelledError:
            pending = self._done.setdefault(consumer, {})
            for tp, offset in mine.items():  # keep them for the final flush (unless overtaken)
                pending[tp] = max(offset, pending.get(tp, 0))
            raise

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is done of the partitions this consumer is about to give up."""
        await self.flush(only=set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


def subscribe(
    broker: KafkaBroker,
    settings: Settings,
    subscription: Subscription,
    handle: Handle,
    commits: OffsetCommits,
) -> Any:
    """Subscribe ``handle`` to the subscription's topic on ``broker``; return the subscriber."""
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
        heartbeat_interval_ms=max(settings.consumer_session_timeout_ms // 5, 100),
        listener=commits,
        **extra,
    )

    @subscriber
    async def on_record(message: KafkaMessage) -> None:
        record = incoming(message)
        try:
            await handle(record)
        except BaseException:
            # not done: the consumer goes back to this record, and nothing after it is committed
            # before it is handled
            await message.nack()
            raise
        consumer = message.consumer
        assert isinstance(consumer, AIOKafkaConsumer)
        commits.done(consumer, record.topic, record.partition, record.offset)

    return subscriber


@contextlib.asynccontextmanager
async def consuming(
    wiring: Wiring, subscription: Subscription, handle: Handle
) -> AsyncIterator[None]:
    """Consume ``subscription`` with ``handle`` while the block runs; on leaving it, commit
    what is done and stop the broker."""
    commits = OffsetCommits()
    broker = wiring.broker()
    subscriber = subscribe(broker, wiring.settings, subscription, handle, commits)
    wiring.health.check("consumer_assigned", consumer_assigned(subscriber))
    await broker.start()
    committer = asyncio.create_task(
        commits.run(wiring.stop), name=f"offset-commits:{subscription.group}"
    )
    try:
        yield
    finally:
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await commits.flush()
        await broker.stop()
