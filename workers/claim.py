"""The claim worker: a FastStream subscriber on ``qm.requests`` in a consumer group.

Every record read gets exactly one outcome: a reply, a dead letter, or a retry in place. The
record's bytes reach the handler untouched (``parse_raw``): no framework step decodes a header, so
none can drop a record whose headers are not UTF-8 or whose key or value is null.

Each request is processed in a database transaction (shared with the requests that arrive beside
it: the group commit of ``workers.requests``); the Kafka offset is committed only after that
transaction committed (a handler interrupted before it finished is not acknowledged and the record
is read again).

Several consumers of the group run in one process (``QM_WORKER_CONSUMERS``), each on its own
partitions, each handling its records in order, so requests of one job stay in order.

Offsets are committed in the background (``OffsetCommits``): a handler marks its record done and
takes the next one at once instead of waiting for the broker to confirm the commit, which costs a
group-coordinator write (5 ms or more on Kafka 4 brokers, whose coordinator lingers to batch
writes) and would double the time each record holds its partition. Only offsets of records whose
transaction committed are ever committed. A crash before the commit means the records done since
the last commit are read again and answered from the inbox, as a crash between transaction and
commit always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.message import KafkaMessage as KafkaRecordMessage
from faststream.message import StreamMessage

from app.settings import Settings
from app.wiring import Wiring, consumer_assigned
from workers.requests import Incoming, RequestProcessor

log = structlog.get_logger()

COMMIT_INTERVAL_SECONDS = 0.05  # how long done offsets wait, so that one commit carries many
COMMIT_TIMEOUT_SECONDS = 10.0  # a commit the broker does not answer in this time is given up


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


def incoming(message: KafkaRecordMessage) -> Incoming:
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
        """A record's transaction committed: its partition may be committed past it."""
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
            # reads these records again and the inbox answers them as before
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


def subscribe_requests(
    broker: KafkaBroker,
    settings: Settings,
    processor: RequestProcessor,
    commits: OffsetCommits,
    consumers: int = 1,
) -> Any:
    """Subscribe ``processor`` to the requests topic on ``broker``; return the subscriber."""
    extra: dict[str, Any] = {"max_workers": consumers} if consumers > 1 else {}
    subscriber = broker.subscriber(
        settings.topic("requests"),
        group_id=settings.consumer_group,
        ack_policy=AckPolicy.MANUAL,  # OffsetCommits commits; on_request seeks back on failure
        auto_offset_reset="earliest",
        parser=parse_raw,
        decoder=as_message,
        no_reply=True,  # replies go through the outbox, never straight from the handler
        max_poll_interval_ms=600_000,
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=max(settings.consumer_session_timeout_ms // 5, 100),
        listener=commits,
        **extra,
    )

    @subscriber
    async def on_request(message: KafkaMessage) -> None:
        record = incoming(message)
        try:
            await processor.process(record)
        except BaseException:
            # not done: the consumer goes back to this record, and nothing after it is committed
            # before it is processed
            await message.nack()
            raise
        consumer = message.consumer
        assert isinstance(consumer, AIOKafkaConsumer)
        commits.done(consumer, record.topic, record.partition, record.offset)

    return subscriber


async def run_claim_worker(wiring: Wiring) -> None:
    """Run the claim worker until ``wiring.stop`` is set."""
    settings, stop = wiring.settings, wiring.stop
    db = wiring.database(pre_ping=False)  # a failed request is retried anyway
    processor = RequestProcessor(settings, db)
    commits = OffsetCommits()
    broker = wiring.broker()
    subscriber = subscribe_requests(broker, settings, processor, commits, settings.worker_consumers)
    wiring.health.check("consumer_assigned", consumer_assigned(subscriber))
    await broker.start()
    committer = asyncio.create_task(commits.run(stop), name="offset-commits")
    log.info(
        "claim_worker_started",
        topic=settings.topic("requests"),
        group=settings.consumer_group,
        consumers=settings.worker_consumers,
    )
    try:
        await stop.wait()
    finally:
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await commits.flush()
        await broker.stop()
        await processor.drain()  # the database closes after this, with the wiring
        log.info("claim_worker_stopped")
