"""Dead letters written to a real broker, and `qm dlt` run as an operator runs it, for the `qm dlt` tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from click.testing import Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.dlt import Origin, dead_letter_headers
from app.errors import InvalidMessage
from app.kafka import client_options, producer_options
from app.settings import Settings, get_settings

DEADLINE_SECONDS = 20.0
HOUR_MS = 3600 * 1000


@dataclass(frozen=True)
class Letter:
    """A dead letter the test writes, and where it landed."""

    key: bytes | None
    value: bytes
    error: BaseException | str
    partition: int = 0
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    original_topic: str | None = None

    @property
    def error_class(self) -> str:
        if isinstance(self.error, BaseException):
            return f"{type(self.error).__module__}.{type(self.error).__qualname__}"
        return "InvalidMessage"


@dataclass(frozen=True)
class Written:
    letter: Letter
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


async def write_dead_letters(
    settings: Settings, dlt: str, letters: Sequence[Letter]
) -> list[Written]:
    """Produce ``letters`` to ``dlt`` with headers from ``dead_letter_headers``."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    written = []
    try:
        for n, letter in enumerate(letters):
            original = letter.original_topic or dlt.removesuffix(".dlt")
            stamp = letter.timestamp_ms or int(time.time() * 1000)
            origin = Origin(original, letter.partition, 1000 + n, stamp, "qm-claim-workers")
            headers = dead_letter_headers(list(letter.headers), origin, letter.error, attempts=3)
            meta = await producer.send_and_wait(
                dlt,
                letter.value,
                key=letter.key,
                partition=letter.partition,
                timestamp_ms=stamp,
                headers=headers,
            )
            written.append(Written(letter, dlt, meta.partition, meta.offset, stamp))
    finally:
        await producer.stop()
    return written


async def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes, list]]:
    """Every record of ``topic`` (key, value, headers), read to the end offsets within a deadline."""
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
    await consumer.start()
    found = []
    try:
        admin = AIOKafkaAdminClient(**client_options(settings))
        await admin.start()
        try:
            [described] = await admin.describe_topics([topic])
        finally:
            await admin.close()
        tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + DEADLINE_SECONDS
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            assert time.monotonic() < deadline, f"{topic} was not read to its end in time"
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                found += [(r.key, r.value, list(r.headers)) for r in records]
    finally:
        await consumer.stop()
    return found


async def ledger(engine: AsyncEngine) -> list[tuple[str, int, int, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                'SELECT topic, "partition", "offset", target_topic FROM dlt_replays ORDER BY 1, 2, 3'
            )
        )
        return [(r.topic, r.partition, r.offset, r.target_topic) for r in rows]


async def create_topic(settings: Settings, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


Qm = Callable[..., Awaitable[Result]]


@pytest.fixture(name="qm")
def qm_fixture(topics: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qm]:
    """Run `qm …` as an operator would, with the test's database, broker and topic prefix."""
    settings = topics
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QM_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    monkeypatch.setenv("QM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("COLUMNS", "250")  # wide tables: nothing wraps
    runner = CliRunner()

    async def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        get_settings.cache_clear()
        # the command runs its own event loop, so it runs on a thread of its own
        return await asyncio.to_thread(runner.invoke, app, ["dlt", *args], env=env)

    yield invoke
    get_settings.cache_clear()


def sample(settings: Settings) -> list[Letter]:
    """Dead letters of `requests`: three error classes, two keys, one original header each."""
    now = int(time.time() * 1000)
    return [
        Letter(b"job-1", b'{"n": 0}', InvalidMessage("not JSON"), headers=(("trace", b"t0"),)),
        Letter(b"job-2", b'{"n": 1}', KeyError("site"), timestamp_ms=now - 2 * HOUR_MS),
        Letter(b"job-1", b'{"n": 2}', "schema violation", headers=(("trace", b"t2"),)),
        Letter(None, b'{"n": 3}', KeyError("job"), timestamp_ms=now - HOUR_MS),
    ]


def assert_one_red_line(result: Result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]
