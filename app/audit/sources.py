"""Where the audit reads events: a topic (offsets or a time range, every partition merged by
record time so each partition's facts meet the others' in the reorder window), or a file."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from app.audit.facts import Position
from app.kafka import client_options
from app.settings import Settings

CONNECT_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 15.0  # a read whose position does not move for this long gives up
_FETCH_WAIT_MS = 500
_BATCH_RECORDS = 2000


class SourceError(Exception):
    """A source that cannot be read; its message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Window:
    """What part of a topic to read; None reads from the first or to the last record.

    Offsets are inclusive; ``since_ms`` inclusive and ``until_ms`` exclusive, on record time."""

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None


@asynccontextmanager
async def consumer(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer of no group that never commits; a broker away is a ``SourceError``."""
    timeout_ms = int(CONNECT_TIMEOUT_SECONDS * 1000)
    client = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        request_timeout_ms=timeout_ms,
        fetch_max_wait_ms=_FETCH_WAIT_MS,
    )
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            await client.start()
    except (KafkaError, OSError, TimeoutError):
        await client.stop()
        raise SourceError(
            f"Kafka cannot be reached at {settings.kafka_bootstrap_servers}"
        ) from None
    try:
        yield client
    finally:
        await client.stop()


async def partitions(settings: Settings, topic: str) -> set[int]:
    """The topic's partition numbers, from the cluster's metadata (empty: no such topic)."""
    admin = AIOKafkaAdminClient(
        **client_options(settings), request_timeout_ms=int(CONNECT_TIMEOUT_SECONDS * 1000)
    )
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            await admin.start()
            described = await admin.describe_topics([topic])
    except (KafkaError, OSError, TimeoutError):
        raise SourceError(
            f"Kafka cannot be reached at {settings.kafka_bootstrap_servers}"
        ) from None
    finally:
        await admin.close()
    return {
        part["partition"]
        for entry in described
        if entry["topic"] == topic and entry["error_code"] == 0
        for part in entry["partitions"]
    }


async def _ranges(
    settings: Settings, client: AIOKafkaConsumer, topic: str, window: Window
) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition of the window, the first offset to read and the one to stop before."""
    known = await partitions(settings, topic)
    if not known:
        raise SourceError(f"no topic {topic} on the broker")
    wanted = sorted(known if window.partitions is None else window.partitions)
    missing = [p for p in wanted if p not in known]
    if missing:
        raise SourceError(f"{topic} has no partition {missing[0]}")
    tps = [TopicPartition(topic, p) for p in wanted]
    starts: dict[TopicPartition, int] = dict(await client.beginning_offsets(tps))
    ends: dict[TopicPartition, int] = dict(await client.end_offsets(tps))
    for bound, key in ((window.since_ms, "start"), (window.until_ms, "end")):
        if bound is None:
            continue
        found = await client.offsets_for_times({tp: bound for tp in tps})
        for tp in tps:
            hit = found.get(tp)
            offset = ends[tp] if hit is None else hit.offset
            if key == "start":
                starts[tp] = max(starts[tp], offset)
            else:
                ends[tp] = min(ends[tp], offset)
    if window.from_offset is not None:
        starts = {tp: max(start, window.from_offset) for tp, start in starts.items()}
    if window.to_offset is not None:
        ends = {tp: min(end, window.to_offset + 1) for tp, end in ends.items()}
    return {tp: (starts[tp], ends[tp]) for tp in tps if starts[tp] < ends[tp]}


async def topic_records(
    settings: Settings, client: AIOKafkaConsumer, topic: str, window: Window
) -> AsyncIterator[tuple[Position, bytes | None]]:
    """The window's records, the partitions merged by record time (each in offset order)."""
    ranges = await _ranges(settings, client, topic, window)
    stops = {tp: end for tp, (_, end) in ranges.items()}
    if not stops:
        return
    client.assign(list(stops))
    for tp, (start, _) in ranges.items():
        client.seek(tp, start)
    buffers: dict[TopicPartition, deque[ConsumerRecord[Any, Any]]] = {tp: deque() for tp in stops}
    fetched: set[TopicPartition] = set()  # partitions read up to their stop
    deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
    while stops:
        hungry = [tp for tp in stops if not buffers[tp] and tp not in fetched]
        if hungry:
            batches = await client.getmany(
                *hungry, timeout_ms=_FETCH_WAIT_MS, max_records=_BATCH_RECORDS
            )
            for tp, records in batches.items():
                buffers[tp].extend(r for r in records if r.offset < stops[tp])
            if batches:
                deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
            for tp in hungry:
                if await client.position(tp) >= stops[tp]:
                    fetched.add(tp)
            for tp in [tp for tp in stops if tp in fetched and not buffers[tp]]:
                del stops[tp]
            if time.monotonic() > deadline:
                raise SourceError(f"reading {topic} stalled for {IDLE_TIMEOUT_SECONDS:.0f}s")
            continue
        tp = min(stops, key=lambda t: buffers[t][0].timestamp)
        record = buffers[tp].popleft()
        yield Position(record.topic, record.partition, record.offset), record.value
        if not buffers[tp] and tp in fetched:
            del stops[tp]


def file_records(path: Path) -> Iterator[tuple[Position, bytes | None]]:
    """A file of events, one a line: the event itself (its position: the file and line), or
    ``{"topic", "partition", "offset", "value"}`` as exported from a topic."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            yield _wrapped(line) or (Position(str(path), 0, number), line)


def _wrapped(line: bytes) -> tuple[Position, bytes | None] | None:
    """The position and value of an exported record; None for a bare event."""
    if b'"offset"' not in line or b'"value"' not in line:
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not {"topic", "partition", "offset", "value"} <= doc.keys():
        return None
    value = doc["value"]
    if not isinstance(doc["offset"], int) or not isinstance(doc["partition"], int):
        return None
    encoded = None if value is None else (value if isinstance(value, str) else json.dumps(value))
    position = Position(str(doc["topic"]), doc["partition"], doc["offset"])
    return position, None if encoded is None else encoded.encode()
