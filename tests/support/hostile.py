"""What a hostile producer sends, and what the tests read back: records on chosen partitions (a
header name that is not UTF-8 included, as librdkafka or Go producers can write), and the replies
and dead letters on the real topics."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from app.dlt import header
from app.kafka import client_options, producer_options
from app.settings import Settings
from tests.support.leasing import COLLECTOR_PUBLIC_KEY

NESTED = b"[" * 1000 + b"]" * 1000  # 2 KB of JSON nested 1,000 deep


class RawName(str):
    """A header name that is written as the raw bytes it holds (aiokafka's builders encode a
    name with ``name.encode("utf-8")``, so this one writes bytes that are not UTF-8)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def start_body(job_id: str, site: str = "board") -> dict[str, Any]:
    return {
        "type": "job.start",
        "v": 1,
        "request_id": str(uuid.uuid4()),
        "job_id": job_id,
        "site": site,
        "collector": "hostile",
        "wait_seconds": 0,
        "public_key": COLLECTOR_PUBLIC_KEY,
    }


@dataclass(frozen=True)
class Sent:
    """A record to send: where, and what."""

    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    raw_batch: bool = False  # built by aiokafka's pure-Python builder (header names as bytes)


def valid_start(partition: int, job_id: str) -> Sent:
    body = start_body(job_id)
    return Sent(
        partition,
        job_id.encode(),
        json.dumps(body).encode(),
        [("correlation_id", body["request_id"].encode())],
    )


async def produce(settings: Settings, records: list[Sent]) -> None:
    """Send ``records`` to the requests topic, in order, each on its partition."""
    # not idempotent: aiokafka's idempotent producer takes its own compiled batches only
    producer = AIOKafkaProducer(**{**producer_options(settings), "enable_idempotence": False})
    await producer.start()
    topic = settings.topic("requests")
    try:
        for record in records:
            if record.raw_batch:
                batch = producer.create_batch()
                # the pure-Python builder writes what a name's encode() returns, bytes included
                batch._builder = _DefaultRecordBatchBuilderPy(  # type: ignore[attr-defined]
                    2, 0, 0, -1, -1, 0, 1 << 20
                )
                batch.append(
                    timestamp=None, key=record.key, value=record.value, headers=record.headers
                )
                await (await producer.send_batch(batch, topic, partition=record.partition))
            else:
                await producer.send_and_wait(
                    topic,
                    record.value,
                    key=record.key,
                    headers=record.headers,
                    partition=record.partition,
                )
    finally:
        await producer.stop()


@dataclass
class Seen:
    """Replies by correlation id, and dead letters, read from the real topics."""

    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = field(
        default_factory=list
    )


async def read_until(settings: Settings, done: Any, timeout: float) -> Seen:
    """Read the replies and requests' dead-letter topics until ``done(seen)`` is true; fail after
    ``timeout`` seconds, saying what was seen."""
    seen = Seen()
    consumer = AIOKafkaConsumer(
        settings.topic("replies"),
        settings.topic("requests.dlt"),
        **client_options(settings),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            while not done(seen):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        headers = list(record.headers)
                        if record.topic.endswith(".dlt"):
                            seen.dead.append((record.key, record.value, headers))
                        elif correlation := header(headers, "correlation_id"):
                            seen.replies[correlation] = json.loads(record.value or b"null")
    except TimeoutError:
        raise AssertionError(
            f"not done within {timeout}s: {len(seen.replies)} replies, {len(seen.dead)} dead "
            "letters"
        ) from None
    finally:
        await consumer.stop()
    return seen
