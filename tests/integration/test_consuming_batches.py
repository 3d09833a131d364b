"""Consumption in fetched batches against the real broker: a burst is taken in a few fetches, a
lone record at idle is handed over at once, and a record that could not be handed over is read
again with nothing after it committed before it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from app.health import RECORDS_PER_FETCH
from app.kafka import client_options, producer_options
from app.root import Wiring
from app.settings import Settings
from tests.support.waiting import eventually
from workers import consuming
from workers.consuming import (
    COMMIT_INTERVAL_SECONDS,
    FETCH_WAIT_MS,
    Incoming,
    Subscription,
    pipelined,
)

BURST = 200


def fetches(group: str) -> tuple[float, float]:
    """How many fetches returned records for ``group``, and how many records they held."""
    count = sum_ = 0.0
    for metric in RECORDS_PER_FETCH.collect():
        for sample in metric.samples:
            if sample.labels.get("group") == group:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    sum_ = sample.value
    return count, sum_


class Handed:
    """A ``Submit`` that records what it was handed and finishes it (unless told to hold it)."""

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.at: dict[int, float] = {}
        self.finished: list[int] = []
        self.held: dict[int, Callable[[], None]] = {}
        self.hold: set[int] = set()
        self.raise_once: set[int] = set()

    async def __call__(self, record: Incoming, finished: Callable[[], None]) -> None:
        self.offsets.append(record.offset)
        self.at.setdefault(record.offset, time.monotonic())
        if record.offset in self.raise_once:
            self.raise_once.discard(record.offset)
            raise RuntimeError("the handler could not take it")
        if record.offset in self.hold:
            self.held[record.offset] = finished
            return
        self.finished.append(record.offset)
        finished()


@asynccontextmanager
async def consumed(settings: Settings, handed: Handed) -> AsyncIterator[Wiring]:
    settings = settings.model_copy(update={"topic_partitions": 1})
    wiring = Wiring(settings, asyncio.Event(), "worker")
    subscription = Subscription(settings.topic("requests"), settings.consumer_group, 1)
    try:
        async with pipelined(wiring, subscription, handed, max_in_flight=64):
            yield wiring
    finally:
        wiring.stop.set()
        await wiring.close()


@asynccontextmanager
async def producing(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def send(producer: AIOKafkaProducer, settings: Settings, n: int) -> None:
    sent = [await producer.send(settings.topic("requests"), b"%d" % i, key=b"k") for i in range(n)]
    await asyncio.gather(*sent)


async def committed(settings: Settings) -> int:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        offsets: dict[Any, Any] = await admin.list_consumer_group_offsets(settings.consumer_group)
    finally:
        await admin.close()
    return max((o.offset for o in offsets.values()), default=0)


async def test_a_burst_of_records_is_taken_in_fewer_fetches_than_records(
    topics: Settings,
) -> None:
    settings = topics
    handed = Handed()
    async with producing(settings) as producer:
        await send(producer, settings, BURST)  # all there before the consumer starts
    async with consumed(settings, handed):
        await eventually(lambda: _true(len(handed.finished) == BURST), timeout=60)
        await eventually(_committed_to(settings, BURST), timeout=30)
    assert handed.offsets == list(range(BURST))  # in order, each once
    count, records = fetches(settings.consumer_group)
    assert records == BURST
    assert 1 <= count < BURST / 4, count  # bounded by 64 in flight: at least 4 fetches


async def test_a_lone_record_at_idle_is_handed_over_at_once(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = topics
    empty = 0
    getmany = AIOKafkaConsumer.getmany

    async def counted(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        nonlocal empty
        fetched = await getmany(self, *args, **kwargs)
        empty += not fetched
        return fetched

    async def empty_since(than: int) -> bool:
        return empty > than

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", counted)
    handed = Handed()
    async with producing(settings) as producer, consumed(settings, handed):
        # idle: the consumer has partitions, and its fetches came back empty more than once
        await eventually(lambda: _true(empty >= 2), timeout=60)
        for n in range(3):
            sent_at = time.monotonic()
            await (await producer.send(settings.topic("requests"), b"lone", key=b"k"))
            await eventually(partial(_more, handed.finished, n), timeout=10, every=0.01)
            # far sooner than an idle fetch's wait: the record is not held for a timer
            assert handed.at[n] - sent_at < FETCH_WAIT_MS / 1000 / 2, handed.at[n] - sent_at
            await eventually(partial(empty_since, empty), timeout=10)  # idle again


async def test_a_record_not_handed_over_is_read_again_and_nothing_after_it_is_committed(
    topics: Settings,
) -> None:
    settings = topics
    handed = Handed()
    handed.raise_once = {3}  # its handing over raises, once
    handed.hold = {3}  # and then its outcome waits: nothing from it on may be committed
    async with producing(settings) as producer:
        await send(producer, settings, 10)
    async with consumed(settings, handed):
        await eventually(lambda: _true(len(handed.finished) == 9), timeout=60)
        # read again from it: 3 again, then the records after it, none of them twice
        assert handed.offsets == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
        await eventually(_committed_to(settings, 3), timeout=30)
        # 4..9 are done, but 3 is not: over several commit rounds, nothing passes it
        for _ in range(5):
            await asyncio.sleep(COMMIT_INTERVAL_SECONDS * 2)  # a window, not a wait for a state
            assert await committed(settings) == 3
        handed.held.pop(3)()
        await eventually(_committed_to(settings, 10), timeout=30)
    assert sorted(handed.finished) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def _committed_to(settings: Settings, offset: int) -> Callable[[], Any]:
    async def check() -> bool:
        return await committed(settings) == offset

    return check


async def _more(items: list[int], than: int) -> bool:
    return len(items) > than


async def _true(value: bool) -> bool:
    return value


async def test_a_consumer_whose_reading_fails_stops_its_process(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a bug past the handing over (here: turning a record into an Incoming raises) ends the
    # consumer's reading; the process must stop rather than keep partitions nobody reads
    settings = topics

    def broken(record: Any) -> Incoming:
        raise RuntimeError("a bug")

    monkeypatch.setattr(consuming, "incoming", broken)
    async with producing(settings) as producer:
        await send(producer, settings, 1)
    with pytest.raises(RuntimeError, match="a bug"):  # the process ends as failed
        async with consumed(settings, Handed()) as wiring:
            await eventually(lambda: _true(wiring.stop.is_set()), timeout=60)
