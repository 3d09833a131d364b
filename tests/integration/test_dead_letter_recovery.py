"""Dead letters end to end: the real claim worker and relay (`qm run all`), Kafka and PostgreSQL.

- A request over the relay's message limit, then ten small bad ones: eleven dead letters arrive
  (the big one's value kept in PostgreSQL), the relay's backlog and the group's lag return to zero,
  and `qm dlt replay` of the big one puts its original bytes back on the requests topic.
- Replaying the same selection twice after some copies failed again: the second run sends
  nothing; with `--again` it sends them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from click.testing import Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.dlt import PREFIX, REPLAYED_FROM, Origin, dead_letter_headers, header
from app.dlt.reader import Selection
from app.dlt.replay import ReplayOptions, replay
from app.kafka import producer_options
from app.settings import Settings, get_settings
from tests.integration.conftest_outbox import read_topic
from tests.support.kafka import lag_returns_to_zero
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

BIG = 1_500_000  # over the relay's 1 MiB message limit, under the broker's


@pytest.fixture
async def server(topics: Settings) -> AsyncIterator[Settings]:
    with QmProcess(topics, "all") as process:
        yield topics
        assert process.proc is not None and process.proc.poll() is None, "qm run all stopped"


async def produce(settings: Settings, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(**producer_options(settings), max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(
                settings.topic("requests"), value, key=key, headers=[("trace", key or b"")]
            )
    finally:
        await producer.stop()


async def dead_letters(settings: Settings, count: int) -> list[ConsumerRecord]:
    """The dead letters of the requests topic, once there are ``count`` (fails after 60 s)."""

    async def enough() -> list[ConsumerRecord] | None:
        found = await read_topic(settings, settings.topic("requests.dlt"))
        assert len(found) <= count, f"{len(found)} dead letters, more than {count}"
        return found if len(found) == count else None

    return await eventually(enough, timeout=60, every=0.3)


async def outbox_backlog(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one())


async def test_an_oversized_request_and_ten_bad_ones_make_eleven_dead_letters_and_replay_whole(
    server: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = server
    big = json.dumps({"type": "job.start", "blob": "z" * BIG}).encode()
    await produce(settings, [(b"big", big), *((b"bad-%d" % n, b"{not json") for n in range(10))])

    letters = await dead_letters(settings, 11)

    async def relay_caught_up() -> bool:
        return await outbox_backlog(engine) == 0

    await eventually(relay_caught_up, timeout=30)
    await lag_returns_to_zero(settings)

    [first] = [r for r in letters if r.key == b"big"]
    headers = list(first.headers)
    assert first.value is None  # kept in PostgreSQL instead
    assert header(headers, PREFIX + "value_bytes") == str(len(big))
    assert header(headers, "trace") == "big"
    assert sorted(r.key for r in letters if r.key != b"big") == sorted(
        b"bad-%d" % n for n in range(10)
    )

    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QM_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    monkeypatch.setenv("QM_TOPIC_PREFIX", settings.topic_prefix)
    shown = await qm("show", "requests", "--key", "big", "--json", "--width", "40")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["value"].startswith('{"type":"job.start","blob":"zzz')
    result = await qm("replay", "requests", "--key", "big")
    assert result.exit_code == 0, result.output
    assert "1 replayed" in result.stdout

    copies = [
        r
        for r in await read_topic(settings, settings.topic("requests"))
        if header(list(r.headers), REPLAYED_FROM) is not None
    ]
    assert [(c.key, c.value) for c in copies] == [(b"big", big)]
    assert list(copies[0].headers)[:-1] == [("trace", b"big")]
    # still too large: it fails again, and again travels without its value
    again = await dead_letters(settings, 12)
    [child] = [r for r in again if header(list(r.headers), REPLAYED_FROM) is not None]
    assert (child.key, child.value) == (b"big", None)
    assert header(list(child.headers), REPLAYED_FROM) == (
        f"{settings.topic('requests.dlt')}:{first.partition}:{first.offset}"
    )


async def qm(*args: str) -> Result:
    """`qm dlt …` as an operator runs it (the environment set by the caller)."""
    get_settings.cache_clear()
    try:
        return await asyncio.to_thread(CliRunner().invoke, app, ["dlt", *args])
    finally:
        get_settings.cache_clear()


async def test_a_second_replay_of_the_same_selection_sends_nothing_and_again_sends_them(
    server: Settings,
) -> None:
    settings = server
    dlt = settings.topic("requests.dlt")
    # three dead letters whose requests are fine now (as after a fix): their copies are answered
    fine = [
        json.dumps(
            {"type": "job.cancel", "v": 1, "request_id": str(uuid.uuid4()), "job_id": f"j{n}"}
        ).encode()
        for n in range(3)
    ]
    await write_letters(settings, dlt, [(b"fine-%d" % n, value) for n, value in enumerate(fine)])
    # and three bad ones, through the worker: their copies fail again
    await produce(settings, [(b"bad-%d" % n, b"[1, 2") for n in range(3)])
    await dead_letters(settings, 6)

    first = await replay(settings, dlt, Selection(), ReplayOptions())
    assert (first.selected, first.replayed) == (6, 6)
    letters = await dead_letters(settings, 9)  # the three bad copies failed again
    children = [r for r in letters if header(list(r.headers), REPLAYED_FROM)]
    assert sorted(r.key for r in children) == [b"bad-0", b"bad-1", b"bad-2"]

    second = await replay(settings, dlt, Selection(), ReplayOptions())
    assert (second.selected, second.replayed) == (9, 0)
    assert (second.already_replayed, second.failed_again) == (9, 3)

    third = await replay(settings, dlt, Selection(), ReplayOptions(again=True))
    assert third.replayed == 9


async def write_letters(
    settings: Settings, dlt: str, records: Sequence[tuple[bytes, bytes]]
) -> None:
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        for n, (key, value) in enumerate(records):
            origin = Origin(settings.topic("requests"), 0, n, 0, settings.consumer_group)
            headers = dead_letter_headers([], origin, KeyError("site"), attempts=3)
            await producer.send_and_wait(dlt, value, key=key, headers=headers)
    finally:
        await producer.stop()
