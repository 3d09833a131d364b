"""Helpers of the outbox tests: write numbered rows per key, run relays, read a topic back, judge it."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options
from app.outbox.relay import Relay
from app.outbox.writer import MESSAGE_ID, Outbox
from app.settings import Settings
from app.store.outbox import backlog

Numbered = tuple[str, int]  # (key, its sequence number within the key)


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05
) -> float:
    """Poll ``condition`` until true; returns the seconds it took, fails after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if await condition():
            return time.monotonic() - start
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout:.1f}s: {what}")


async def write_numbered(
    engine: AsyncEngine, settings: Settings, topic: str, rows: Sequence[Numbered]
) -> None:
    """Commit ``rows`` in one transaction; each payload names its key and sequence number."""
    box = Outbox(settings.outbox_shards)
    for key, seq in rows:
        box.add(topic, key, {"key": key, "seq": seq})
    async with engine.begin() as conn:
        await box.flush(conn)


async def outbox_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return (await backlog(conn)).rows


@asynccontextmanager
async def running_relays(settings: Settings, count: int) -> AsyncIterator[list[Relay]]:
    """``count`` relays running as tasks; stopped (and checked for crashes) on exit."""
    stop = asyncio.Event()
    relays = [Relay(settings) for _ in range(count)]
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        yield relays
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        assert not pending, "a relay did not stop within 30 s"
        for task in done:
            task.result()


async def read_topic(settings: Settings, topic: str, timeout: float = 30.0) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning up to its end offsets as of now."""
    consumer = AIOKafkaConsumer(
        topic, **client_options(settings), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()  # subscribing without a group fetches the topic's metadata
    try:
        numbers = consumer.partitions_for_topic(topic)
        assert numbers, f"topic {topic} has no partitions"
        partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        consumer.unsubscribe()
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"could not read {topic} to its end in {timeout}s"
            batches = await consumer.getmany(*partitions, timeout_ms=500)
            for tp in partitions:
                records.extend(batches.get(tp, []))
        return records
    finally:
        await consumer.stop()


@dataclass
class Verdict:
    """What a consumer saw: per key, the sequence numbers in first-seen order; the repeats."""

    seen: dict[str, list[int]] = field(default_factory=dict)
    duplicates: int = 0
    records: int = 0

    def assert_complete_and_ordered(self, written: Sequence[Numbered]) -> None:
        expected: dict[str, list[int]] = defaultdict(list)
        for key, seq in written:
            expected[key].append(seq)
        for key, seqs in expected.items():
            assert self.seen.get(key) == sorted(seqs), f"key {key}: {self.seen.get(key)}"
        assert set(self.seen) == set(expected), "records of keys nobody wrote"


def judge(records: Sequence[ConsumerRecord]) -> Verdict:
    """Deduplicate by message id (first copy wins, as consumers do) in log order per partition."""
    verdict = Verdict(records=len(records))
    message_ids: set[bytes] = set()
    seen: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        message_id = dict(record.headers)[MESSAGE_ID]
        if message_id in message_ids:
            verdict.duplicates += 1
            continue
        message_ids.add(message_id)
        body = json.loads(record.value)
        assert record.key == body["key"].encode()
        seen[body["key"]].append(body["seq"])
    verdict.seen = dict(seen)
    return verdict
