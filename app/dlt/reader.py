"""Reading dead-letter topics: manual assignment, seeks by offset or time, and the shared filters.

The reader never joins a consumer group and never commits: it takes a snapshot of each partition's
end offset, reads up to it and stops, so what it reports is a stable picture of the topic.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from app.dlt.letter_headers import PREFIX, REPLAYED_FROM, VALUE_REF, VALUE_SHA256, OffsetRange
from app.kafka import client_options
from app.kafka_headers import header
from app.settings import Settings

DLT_SUFFIX = ".dlt"
# how long a command waits for the broker before it says it cannot be reached
CONNECT_TIMEOUT_SECONDS = 10.0
# how long a read may go without the position moving before it gives up
IDLE_TIMEOUT_SECONDS = 15.0
_FETCH_WAIT_MS = 500
_BATCH_RECORDS = 500


class DltError(Exception):
    """A failure an operator can act on; its message is one line, fit to print as is."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic, as read."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @property
    def error_class(self) -> str | None:
        return header(self.headers, PREFIX + "error_class")

    @property
    def original_topic(self) -> str | None:
        return header(self.headers, PREFIX + "original_topic")

    @property
    def coordinates(self) -> str:
        """``topic:partition:offset``, the value of ``qm.replayed_from``."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def value_ref(self) -> str | None:
        """The id under which PostgreSQL keeps the value, when it was too large to travel here."""
        return header(self.headers, VALUE_REF)

    @property
    def value_sha256(self) -> str | None:
        return header(self.headers, VALUE_SHA256)

    @property
    def parent(self) -> tuple[str, int, int] | None:
        """The dead letter this one's record was replayed from (it failed again), if any."""
        return parse_coordinates(header(self.headers, REPLAYED_FROM))


def parse_coordinates(text: str | None) -> tuple[str, int, int] | None:
    """``(topic, partition, offset)`` from ``topic:partition:offset``; None if unreadable."""
    if not text:
        return None
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic or not partition.isdigit() or not rest.isdigit():
        return None
    return topic, int(partition), int(rest)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on; every field left None selects everything.

    Offsets are inclusive at both ends; ``since_ms`` is inclusive and ``until_ms`` exclusive, both
    on the record's timestamp. ``error_class`` matches the full class name or its last part.
    """

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    error_class: str | None = None
    key: str | None = None

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is selected (the offset and time bounds are checked again here)."""
        checks = (
            self.partitions is None or letter.partition in self.partitions,
            self.from_offset is None or letter.offset >= self.from_offset,
            self.to_offset is None or letter.offset <= self.to_offset,
            self.since_ms is None or letter.timestamp_ms >= self.since_ms,
            self.until_ms is None or letter.timestamp_ms < self.until_ms,
            self.key is None or letter.key == self.key.encode(),
            self.error_class is None or _class_matches(letter.error_class, self.error_class),
        )
        return all(checks)


def _class_matches(actual: str | None, wanted: str) -> bool:
    return actual is not None and (actual == wanted or actual.rsplit(".", 1)[-1] == wanted)


_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime | None = None, option: str = "a time") -> int:
    """Milliseconds since the epoch from ISO 8601 (UTC when no zone) or an age (``30m``, ``2h``).

    Anything that is not a time at or after 1970-01-01 (where Kafka timestamps start) is a
    ``DltError`` naming ``option``: never a ValueError or an OverflowError."""
    age = _AGE.match(text.strip().lower())
    when: datetime
    if age:
        try:
            delta = timedelta(seconds=float(age.group(1)) * _AGE_SECONDS[age.group(2)])
            when = (now or datetime.now(UTC)) - delta
        except (OverflowError, ValueError):
            when = datetime.min.replace(tzinfo=UTC)
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise DltError(
                f"{option}: cannot read the time {text!r}: give ISO 8601 (2024-05-01T10:00Z) "
                "or an age (30m, 2h, 7d)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    if when < _EPOCH:
        raise DltError(f"{option} {text!r} is before 1970-01-01, where Kafka timestamps start")
    return int(when.timestamp() * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class ScanPlan:
    """What a read covers: per partition, the offsets from the first candidate to the end."""

    topic: str
    ranges: list[OffsetRange] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)


class DltReader:
    """A started consumer with no group (and an admin client for metadata), used to list, plan
    and read dead-letter topics."""

    def __init__(
        self, consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient, settings: Settings
    ) -> None:
        self._consumer = consumer
        self._admin = admin
        self._settings = settings
        self._partitions: dict[str, set[int]] | None = None

    async def partitions(self) -> dict[str, set[int]]:
        """Every topic on the cluster with its partition numbers (read once per reader)."""
        if self._partitions is None:
            described = await self._admin.describe_topics()
            self._partitions = {
                entry["topic"]: {part["partition"] for part in entry["partitions"]}
                for entry in described
                if entry["error_code"] == 0
            }
        return self._partitions

    async def all_topics(self) -> set[str]:
        """Every topic on the cluster."""
        return set(await self.partitions())

    async def dlt_topics(self) -> list[str]:
        """Dead-letter topics under the configured prefix, sorted."""
        prefix = self._settings.topic_prefix
        return sorted(
            name
            for name in await self.all_topics()
            if name.startswith(prefix) and name.endswith(DLT_SUFFIX)
        )

    async def resolve(self, name: str) -> str:
        """The dead-letter topic ``name`` means: as given, or with the prefix and/or ``.dlt``."""
        prefixed = self._settings.topic(name)
        candidates = [name, prefixed, name + DLT_SUFFIX, prefixed + DLT_SUFFIX]
        existing = await self.all_topics()
        for candidate in candidates:
            if candidate in existing and candidate.endswith(DLT_SUFFIX):
                return candidate
        if name in existing:
            raise DltError(f"{name} is not a dead-letter topic (their names end in {DLT_SUFFIX})")
        known = ", ".join(await self.dlt_topics()) or "none"
        raise DltError(f"unknown topic {name}; dead-letter topics: {known}")

    async def plan(self, topic: str, selection: Selection) -> ScanPlan:
        """Per selected partition, the first offset worth reading and the end snapshot."""
        partitions = (await self.partitions()).get(topic, set())
        wanted = sorted(partitions if selection.partitions is None else selection.partitions)
        missing = [p for p in wanted if p not in partitions]
        if missing:
            raise DltError(
                f"{topic} has no partition {missing[0]} (its partitions: 0 to {len(partitions) - 1})"
            )
        tps = [TopicPartition(topic, p) for p in wanted]
        if not tps:
            return ScanPlan(topic)
        firsts = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps)
        starts = {tp: max(firsts[tp], selection.from_offset or 0) for tp in tps}
        if selection.since_ms is not None:
            # the earliest offset whose timestamp is at or after `since`: every earlier record
            # is older, so the read can start there
            found = await self._consumer.offsets_for_times({tp: selection.since_ms for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                starts[tp] = max(starts[tp], hit.offset if hit is not None else ends[tp])
        if selection.to_offset is not None:
            ends = {tp: min(ends[tp], selection.to_offset + 1) for tp in tps}
        return ScanPlan(
            topic, [OffsetRange(tp.partition, starts[tp], max(starts[tp], ends[tp])) for tp in tps]
        )

    async def read(self, plan: ScanPlan) -> AsyncGenerator[DeadLetter, None]:
        """Every record of ``plan``'s ranges, partition by partition in offset order."""
        stops = {TopicPartition(plan.topic, r.partition): r.end for r in plan.ranges if r.size}
        if not stops:
            return
        self._consumer.assign(list(stops))
        for r in plan.ranges:
            if r.size:
                self._consumer.seek(TopicPartition(plan.topic, r.partition), r.start)
        deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
        while stops:
            batches = await self._consumer.getmany(
                *stops, timeout_ms=_FETCH_WAIT_MS, max_records=_BATCH_RECORDS
            )
            for tp, records in batches.items():
                for record in records:
                    if record.offset < stops.get(tp, -1):
                        yield _dead_letter(record)
            if batches:
                deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
            for tp in list(stops):
                if await self._consumer.position(tp) >= stops[tp]:
                    self._consumer.pause(tp)
                    del stops[tp]
            if stops and time.monotonic() > deadline:
                raise DltError(
                    f"reading {plan.topic} stalled for {IDLE_TIMEOUT_SECONDS:.0f}s; is the broker healthy?"
                )

    async def select(
        self, plan: ScanPlan, selection: Selection
    ) -> AsyncGenerator[DeadLetter, None]:
        """The records of ``plan`` that ``selection`` matches."""
        async for letter in self.read(plan):
            if selection.matches(letter):
                yield letter


def _dead_letter(record: ConsumerRecord) -> DeadLetter:
    headers: Iterable[tuple[str, bytes]] = record.headers or ()
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value,
        headers=tuple(headers),
    )


def kafka_unreachable(settings: Settings, exc: BaseException) -> DltError:
    """The one-line error for a broker that does not answer."""
    why = (
        f"no answer within {CONNECT_TIMEOUT_SECONDS:.0f}s"
        if isinstance(exc, TimeoutError)
        else "connection failed"
    )
    return DltError(f"Kafka cannot be reached at {settings.kafka_bootstrap_servers}: {why}")


@asynccontextmanager
async def open_reader(settings: Settings) -> AsyncIterator[DltReader]:
    """A started reader; a broker that cannot be reached is a ``DltError``."""
    timeout_ms = int(CONNECT_TIMEOUT_SECONDS * 1000)
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=timeout_ms)
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # aborted transactions are not dead letters anyone meant to keep
        isolation_level="read_committed",
        request_timeout_ms=timeout_ms,
        fetch_max_wait_ms=_FETCH_WAIT_MS,
    )
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await admin.start()
                await consumer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise kafka_unreachable(settings, exc) from exc
        try:
            yield DltReader(consumer, admin, settings)
        except (KafkaError, TimeoutError) as exc:
            raise DltError(f"Kafka failed: {type(exc).__name__}: {exc}") from exc
    finally:
        await consumer.stop()
        await admin.close()


def sorted_letters(letters: Sequence[DeadLetter]) -> list[DeadLetter]:
    """Letters in (partition, offset) order, the order a person reads them in."""
    return sorted(letters, key=lambda letter: (letter.partition, letter.offset))


@dataclass(slots=True)
class TopicSummary:
    """What `qm dlt ls` shows of one dead-letter topic."""

    topic: str
    partitions: int
    records: int = 0
    by_error_class: Counter[str] = field(default_factory=Counter)
    oldest_ms: int | None = None
    newest_ms: int | None = None

    def add(self, letter: DeadLetter) -> None:
        self.records += 1
        self.by_error_class[letter.error_class or "-"] += 1
        stamp = letter.timestamp_ms
        self.oldest_ms = stamp if self.oldest_ms is None else min(self.oldest_ms, stamp)
        self.newest_ms = stamp if self.newest_ms is None else max(self.newest_ms, stamp)


async def summarize(reader: DltReader) -> list[TopicSummary]:
    """Every dead-letter topic under the prefix, read to its end: counts by class, age range."""
    summaries = []
    for topic in await reader.dlt_topics():
        plan = await reader.plan(topic, Selection())
        summary = TopicSummary(topic, len(plan.ranges))
        async for letter in reader.read(plan):
            summary.add(letter)
        summaries.append(summary)
    return summaries
