"""`qm dlt` against a real broker and a real database: ls, show and replay of dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from click.testing import Result
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.devstack import free_port
from app.dlt import PREFIX, REPLAYED_FROM, OffsetRange, Origin, dead_letter_headers
from app.dlt.reader import DltError, Selection, open_reader, summarize
from app.dlt.replay import ReplayOptions, replay
from app.errors import InvalidMessage
from app.kafka import client_options, producer_options
from app.settings import Settings, get_settings
from app.store.dlt_replays import (
    ReplayedOffset,
    list_replayed,
    record_replays,
    try_lock_topic,
    unlock_topic,
)

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


@pytest.fixture
def qm(topics: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qm]:
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


# --- replay ------------------------------------------------------------------------------


async def test_replay_lands_on_the_original_topic_with_key_value_and_headers_kept(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    written = await write_dead_letters(settings, dlt, sample(settings))

    result = await qm("replay", dlt, "--error-class", "InvalidMessage")

    assert result.exit_code == 0, result.output
    assert "2 selected, 2 replayed" in result.stdout
    chosen = [w for w in written if w.letter.error_class.endswith("InvalidMessage")]
    assert all(w.letter.headers for w in chosen)
    copies = await read_topic(settings, settings.topic("requests"))
    assert sorted((k, v) for k, v, _ in copies) == sorted(
        (w.letter.key, w.letter.value) for w in chosen
    )
    for key, value, headers in copies:
        [source] = [w for w in chosen if (w.letter.key, w.letter.value) == (key, value)]
        assert headers == [
            *source.letter.headers,
            (REPLAYED_FROM, f"{dlt}:{source.partition}:{source.offset}".encode()),
        ]
        assert not any(name.startswith(PREFIX) for name, _ in headers)
    assert await ledger(engine) == [
        (dlt, w.partition, w.offset, settings.topic("requests")) for w in chosen
    ]


async def test_a_second_replay_replays_nothing_twice_and_again_does(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    target = settings.topic("requests")
    await write_dead_letters(settings, dlt, sample(settings))

    first = await qm("replay", "requests")  # short names work too
    second = await qm("replay", dlt)
    assert "4 selected, 4 replayed" in first.stdout
    assert "4 selected, 0 replayed" in second.stdout
    assert "4 skipped as already replayed" in second.stdout
    assert len(await read_topic(settings, target)) == 4

    await write_dead_letters(settings, dlt, sample(settings)[:1])
    third = await qm("replay", dlt)
    assert "5 selected, 1 replayed" in third.stdout
    assert len(await read_topic(settings, target)) == 5

    again = await qm("replay", dlt, "--again", "--key", "job-1")
    assert "3 selected, 3 replayed" in again.stdout
    assert len(await read_topic(settings, target)) == 8
    assert len(await ledger(engine)) == 5


async def test_dry_run_lists_what_would_go_and_sends_and_records_nothing(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings))
    await qm("replay", dlt, "--to-offset", "0")

    result = await qm("replay", dlt, "--dry-run")

    assert result.exit_code == 0, result.output
    assert "dry run: 4 selected, 3 would be replayed, 1 skipped as already replayed" in (
        result.stdout
    )
    for offset in (1, 2, 3):
        assert f"0:{offset}" in result.stdout
    assert len(await read_topic(settings, settings.topic("requests"))) == 1
    assert len(await ledger(engine)) == 1


async def test_concurrent_replays_send_each_record_once(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings) * 5)

    async def one_run() -> int:
        try:
            report = await replay(settings, dlt, Selection(), ReplayOptions())
        except DltError as exc:
            assert "another `qm dlt replay`" in str(exc)
            return 0
        return report.replayed

    totals = await asyncio.gather(*(one_run() for _ in range(4)))

    assert sum(totals) == 20
    assert len(await read_topic(settings, settings.topic("requests"))) == 20
    assert len(await ledger(engine)) == 20


async def test_concurrent_ledger_writes_record_each_offset_exactly_once(
    engine: AsyncEngine,
) -> None:
    rows = [ReplayedOffset(0, offset, "qm.requests") for offset in range(50)]

    async def record() -> set[tuple[int, int]]:
        async with engine.begin() as conn:
            return await record_replays(conn, "qm.requests.dlt", rows)

    winners = await asyncio.gather(*(record() for _ in range(5)))

    assert sum(len(won) for won in winners) == 50
    assert set().union(*winners) == {(0, offset) for offset in range(50)}
    async with engine.connect() as conn:
        ranges = [OffsetRange(0, 10, 20)]
        assert await list_replayed(conn, "qm.requests.dlt", ranges) == {
            (0, offset) for offset in range(10, 20)
        }


async def test_one_replay_lock_per_topic(engine: AsyncEngine) -> None:
    async with engine.connect() as first, engine.connect() as second:
        assert await try_lock_topic(first, "qm.requests.dlt")
        assert not await try_lock_topic(second, "qm.requests.dlt")
        assert await try_lock_topic(second, "qm.captures.dlt")
        await unlock_topic(first, "qm.requests.dlt")
        assert await try_lock_topic(second, "qm.requests.dlt")


async def test_rate_spaces_the_sends(topics: Settings) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings))

    began = time.monotonic()
    report = await replay(settings, dlt, Selection(), ReplayOptions(rate=10))

    assert report.replayed == 4
    assert time.monotonic() - began >= 0.3  # four sends at ten a second: three gaps


# --- filters -----------------------------------------------------------------------------


async def test_each_filter_selects_exactly_what_it_says(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt, original = settings.topic("extra.dlt"), settings.topic("extra")
    await create_topic(settings, dlt, 3)
    await create_topic(settings, original, 3)
    now = int(time.time() * 1000)
    letters = [
        Letter(
            f"k{n % 2}".encode(),
            f'{{"n": {n}}}'.encode(),
            [InvalidMessage("x"), KeyError("y"), "bad"][(n // 3) % 3],
            partition=n % 3,
            timestamp_ms=now - (12 - n) * HOUR_MS,
        )
        for n in range(12)
    ]
    written = await write_dead_letters(settings, dlt, letters)
    iso = datetime.fromtimestamp((now - 6 * HOUR_MS) / 1000, UTC).isoformat()

    async def selected(selection: Selection) -> set[tuple[int, int]]:
        report = await replay(settings, dlt, selection, ReplayOptions(dry_run=True))
        assert report.selected == len(report.planned)
        assert {target for _, target in report.planned} <= {original}
        return {(letter.partition, letter.offset) for letter, _ in report.planned}

    def expect(predicate: Callable[[Written], bool]) -> set[tuple[int, int]]:
        return {(w.partition, w.offset) for w in written if predicate(w)}

    cases: list[tuple[Selection, Callable[[Written], bool]]] = [
        (Selection(), lambda w: True),
        (Selection(partitions=frozenset({1})), lambda w: w.partition == 1),
        (Selection(partitions=frozenset({0, 2})), lambda w: w.partition != 1),
        (Selection(from_offset=1), lambda w: w.offset >= 1),
        (Selection(to_offset=1), lambda w: w.offset <= 1),
        (Selection(from_offset=1, to_offset=2), lambda w: 1 <= w.offset <= 2),
        (Selection(since_ms=now - 6 * HOUR_MS), lambda w: w.timestamp_ms >= now - 6 * HOUR_MS),
        (Selection(until_ms=now - 6 * HOUR_MS), lambda w: w.timestamp_ms < now - 6 * HOUR_MS),
        (
            Selection(since_ms=now - 9 * HOUR_MS, until_ms=now - 3 * HOUR_MS),
            lambda w: now - 9 * HOUR_MS <= w.timestamp_ms < now - 3 * HOUR_MS,
        ),
        (
            Selection(error_class="builtins.KeyError"),
            lambda w: w.letter.error_class.endswith("KeyError"),
        ),
        (
            Selection(error_class="InvalidMessage"),
            lambda w: "InvalidMessage" in w.letter.error_class,
        ),
        (
            Selection(error_class="app.errors.InvalidMessage"),
            lambda w: w.letter.error_class == "app.errors.InvalidMessage",
        ),
        (Selection(error_class="Invalid"), lambda w: False),
        (Selection(key="k1"), lambda w: w.letter.key == b"k1"),
        (Selection(key="nope"), lambda w: False),
        (
            Selection(partitions=frozenset({0}), key="k0", since_ms=now - 6 * HOUR_MS),
            lambda w: (
                w.partition == 0 and w.letter.key == b"k0" and w.timestamp_ms >= now - 6 * HOUR_MS
            ),
        ),
    ]
    for selection, predicate in cases:
        assert await selected(selection) == expect(predicate), selection

    # the same through the command line, with an ISO time
    result = await qm("replay", dlt, "--dry-run", "--partition", "2", "--since", iso)
    wanted = expect(lambda w: w.partition == 2 and w.timestamp_ms >= now - 6 * HOUR_MS)
    assert f"dry run: {len(wanted)} selected" in result.stdout


# --- ls and show -------------------------------------------------------------------------


async def test_ls_counts_dead_letters_by_error_class(topics: Settings, qm: Qm) -> None:
    settings = topics
    await write_dead_letters(settings, settings.topic("requests.dlt"), sample(settings))
    await write_dead_letters(
        settings, settings.topic("captures.dlt"), [Letter(b"c", b"{}", ValueError("v"))] * 2
    )

    async with open_reader(settings) as reader:
        summaries = {s.topic: s for s in await summarize(reader)}
    requests = summaries[settings.topic("requests.dlt")]
    assert requests.records == 4
    assert dict(requests.by_error_class) == {
        "builtins.KeyError": 2,
        "app.errors.InvalidMessage": 1,
        "InvalidMessage": 1,
    }
    assert requests.oldest_ms is not None and requests.newest_ms is not None
    assert requests.newest_ms - requests.oldest_ms >= 2 * HOUR_MS - 60_000
    assert dict(summaries[settings.topic("captures.dlt")].by_error_class) == {
        "builtins.ValueError": 2
    }

    result = await qm("ls")
    assert result.exit_code == 0, result.output
    assert "2  builtins.KeyError" in result.stdout
    assert "2  builtins.ValueError" in result.stdout
    assert "(2h ago)" in result.stdout

    listed = await qm("ls", "--json")
    assert listed.exit_code == 0, listed.output
    by_topic = {row["topic"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert by_topic[settings.topic("requests.dlt")]["records"] == 4
    assert by_topic[settings.topic("captures.dlt")]["by_error_class"] == {"builtins.ValueError": 2}


async def test_show_redacts_a_canary_secret(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    canary = "CANARY-7f3a91"
    value = f'{{"type": "session.put", "storage_state": {{"cookies": [{{"v": "{canary}"}}]}}, '
    value += f'"account": {{"password": "{canary}"}}}}'
    letter = Letter(
        b"job-9",
        value.encode(),
        InvalidMessage(f"bad input token={canary}"),
        headers=(
            ("authorization", f"Bearer {canary}".encode()),
            ("note", f"password={canary}".encode()),
        ),
    )
    await write_dead_letters(settings, dlt, [letter])

    table = await qm("show", dlt)
    as_json = await qm("show", dlt, "--json")

    for result in (table, as_json):
        assert result.exit_code == 0, result.output
        assert canary not in result.output
        assert "[redacted]" in result.stdout
        assert "session.put" in result.stdout
    assert "qm.dlt.error_class" in table.stdout


async def test_show_cuts_long_values_and_honours_the_filters(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    long_value = b'{"blob": "' + b"x" * 5000 + b'"}'
    await write_dead_letters(
        settings, dlt, [*sample(settings), Letter(b"big", long_value, KeyError("z"))]
    )

    result = await qm("show", dlt, "--json", "--key", "big", "--width", "50")
    [record] = [json.loads(line) for line in result.stdout.splitlines()]

    assert record["offset"] == 4
    assert len(record["value"]) == 50 and record["value"].endswith("…")
    nothing = await qm("show", dlt, "--key", "nobody")
    assert nothing.exit_code == 0 and "nothing selected" in nothing.stdout


# --- clear errors ------------------------------------------------------------------------


async def test_an_unknown_topic_is_one_red_line_and_exit_code_2(topics: Settings, qm: Qm) -> None:
    for command in ("show", "replay"):
        assert_one_red_line(await qm(command, "no-such-topic"), "unknown topic no-such-topic")
    not_dlt = await qm("show", topics.topic("job-events"))  # which has no dead-letter topic
    assert_one_red_line(not_dlt, "is not a dead-letter topic")
    assert_one_red_line(
        await qm("replay", "requests.dlt", "--since", "soon"), "cannot read the time"
    )
    assert_one_red_line(await qm("replay", "requests.dlt", "--partition", "7"), "no partition 7")


async def test_an_empty_selection_says_nothing_selected_and_exits_0(qm: Qm) -> None:
    result = await qm("replay", "requests.dlt")
    assert result.exit_code == 0, result.output
    assert "nothing selected" in result.stdout


async def test_a_missing_original_topic_is_a_clear_error(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    gone = settings.topic("gone")
    await write_dead_letters(settings, dlt, [Letter(b"k", b"{}", "bad", original_topic=gone)])

    assert_one_red_line(await qm("replay", dlt), f"target topic {gone}", "--to")
    redirected = await qm("replay", dlt, "--to", settings.topic("requests"))
    assert "1 replayed" in redirected.stdout
    assert_one_red_line(await qm("replay", dlt, "--to", dlt, "--again"), "into itself")


async def test_an_unreachable_broker_or_database_is_one_red_line(topics: Settings, qm: Qm) -> None:
    settings = topics
    await write_dead_letters(settings, settings.topic("requests.dlt"), sample(settings))
    no_broker = {"QM_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    no_database = {
        "QM_DATABASE_URL": f"postgresql+asyncpg://qm@127.0.0.1:{free_port()}/quartermaster"
    }

    began = time.monotonic()
    assert_one_red_line(await qm("ls", env=no_broker), "Kafka cannot be reached")
    assert_one_red_line(
        await qm("replay", "requests.dlt", env=no_broker), "Kafka cannot be reached"
    )
    assert_one_red_line(
        await qm("replay", "requests.dlt", env=no_database), "PostgreSQL cannot be reached"
    )
    missing = make_url(settings.database_url).set(database="qm_no_such_database")
    no_such_database = {"QM_DATABASE_URL": missing.render_as_string(hide_password=False)}
    assert_one_red_line(
        await qm("replay", "requests.dlt", env=no_such_database),
        "PostgreSQL cannot be reached",
        "qm_no_such_database",
    )
    assert time.monotonic() - began < 15
