"""The outbox relay under failure: relay processes SIGKILLed, the broker killed and restarted.

Run as ``python -m tests.chaos.test_relay_chaos``, this module is a relay process whose every round
stops dead after its acks, before it deletes anything, until it is killed (settings from
``QM_*``): with rounds pipelined, each of the rounds in flight stops so.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import make_engine
from app.devstack.kafka import KafkaBroker
from app.kafka import ensure_topics
from app.outbox.relay import Relay
from app.settings import Settings
from app.store.outbox import UnsentRow
from tests.integration.conftest_outbox import (
    Numbered,
    judge,
    outbox_rows,
    read_topic,
    running_relays,
    wait_until,
    write_numbered,
)
from tests.support.processes import QmProcess, settings_env

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[2]
ACKED = "RELAY_ACKED"
DEPTH = 3  # rounds the paused relay keeps in flight
# what a survivor's round in flight and the scheduling of a loaded machine may add to the bound
ROUND_ALLOWANCE_SECONDS = 2.0
RNG = random.Random(7)


def takeover_bound(settings: Settings) -> float:
    """Seconds within which survivors own a dead relay's shards, besides a round in flight."""
    return 2 * settings.outbox_poll_seconds


def numbered(keys: Sequence[str], rows: int, numbers: dict[str, Iterator[int]]) -> list[Numbered]:
    chosen = [RNG.choice(keys) for _ in range(rows)]
    return [(key, next(numbers.setdefault(key, count()))) for key in chosen]


async def write_in_transactions(
    engine: AsyncEngine, settings: Settings, topic: str, rows: list[Numbered], per_tx: int = 100
) -> None:
    for start in range(0, len(rows), per_tx):
        await write_numbered(engine, settings, topic, rows[start : start + per_tx])


async def test_a_relay_killed_between_publish_and_delete_loses_nothing_and_its_shards_move(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    keys = [f"k{n:02d}" for n in range(60)]
    written = numbered(keys, 3000, {})
    await write_in_transactions(engine, settings, topic, written)

    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.chaos.test_relay_chaos",
        cwd=ROOT, env=settings_env(settings, outbox_batch_size=100, outbox_pipeline_depth=DEPTH),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # every round in flight acked, none deleted: the relay can start no more
        acked = await asyncio.wait_for(_acked_lines(doomed, len(written)), 60)
        assert acked > 0
        async with running_relays(settings, 2) as survivors:
            killed_at = time.monotonic()
            doomed.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(doomed.wait(), 10) == -signal.SIGKILL
            await wait_until(
                lambda: _all_owned(survivors, settings.outbox_shards),
                takeover_bound(settings) + ROUND_ALLOWANCE_SECONDS,
                "the survivors own every shard",
            )
            took = time.monotonic() - killed_at
            await wait_until(lambda: _empty(engine), 60, "the outbox drained")
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()

    assert took <= takeover_bound(settings) + ROUND_ALLOWANCE_SECONDS
    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered(written)
    assert verdict.duplicates == acked  # exactly the rows acked but not deleted came twice


async def test_a_relay_process_killed_mid_stream_under_load_loses_nothing(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    keys = [f"k{n:02d}" for n in range(40)]
    numbers: dict[str, Iterator[int]] = {}
    written: list[Numbered] = []
    stop_load = asyncio.Event()

    async def load() -> None:
        for _ in range(1000):  # at most 20,000 rows; the test stops it much sooner
            if stop_load.is_set():
                return
            rows = numbered(keys, 20, numbers)
            await write_numbered(engine, settings, topic, rows)
            written.extend(rows)

    with QmProcess(settings, "relay", outbox_batch_size=50) as doomed:
        # the relay is up and publishing before the load starts, so its start-up (a cold
        # interpreter, a broker that just started) is not raced against the load
        first = numbered(keys, 1, numbers)
        await write_numbered(engine, settings, topic, first)
        written.extend(first)
        await wait_until(lambda: _empty(engine), 60, "the relay's first rows published")
        writer = asyncio.create_task(load())
        # kill it while it streams: rows being published, more being written
        await wait_until(lambda: _published_some(engine, writer, 1000), 60, "1000 published")
        doomed.kill()
        stop_load.set()
        await writer
    after = numbered(keys, 500, numbers)
    await write_in_transactions(engine, settings, topic, after)
    written.extend(after)
    async with running_relays(settings, 1):
        await wait_until(lambda: _empty(engine), 60, "the outbox drained")

    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered(written)
    print(f"duplicates after the kill: {verdict.duplicates}")  # allowed; counted for the record


@pytest.fixture
def own_broker() -> Iterator[KafkaBroker]:
    """A broker of this test alone, since the test kills it."""
    with KafkaBroker(heap="512m") as broker:
        yield broker


async def test_rows_written_while_the_broker_is_down_arrive_in_order_once_it_is_back(
    own_broker: KafkaBroker, database_url: str, topic_prefix: str
) -> None:
    settings = Settings(
        database_url=database_url,
        kafka_bootstrap_servers=own_broker.bootstrap,
        topic_prefix=topic_prefix,
        outbox_poll_seconds=0.2,
    )
    await ensure_topics(settings)
    topic = settings.topic("events")
    keys = [f"k{n:02d}" for n in range(40)]
    numbers: dict[str, Iterator[int]] = {}
    written: list[Numbered] = []
    engine = make_engine(settings, pool_size=4)
    try:
        async with running_relays(settings, 2):
            rows = numbered(keys, 500, numbers)
            await write_in_transactions(engine, settings, topic, rows)
            written += rows
            await wait_until(lambda: _empty(engine), 30, "the first rows published")

            own_broker.kill()
            rows = numbered(keys, 1000, numbers)
            await write_in_transactions(engine, settings, topic, rows)
            written += rows
            # the outage: the relays try, and every row waits in the table meanwhile
            await asyncio.sleep(3.0)
            assert await outbox_rows(engine) == 1000

            await asyncio.to_thread(own_broker.restart)
            rows = numbered(keys, 500, numbers)
            await write_in_transactions(engine, settings, topic, rows)
            written += rows
            await wait_until(lambda: _empty(engine), 90, "the outbox drained after the restart")
    finally:
        await engine.dispose()

    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered(written)


async def _acked_lines(process: asyncio.subprocess.Process, written: int) -> int:
    """The rows the paused relay says were acked once its pipeline is full of paused rounds (or
    every row written was acked); its log lines are skipped."""
    assert process.stdout is not None
    acked = rounds = 0
    for _ in range(10_000):
        line = (await process.stdout.readline()).decode()
        assert line, "the relay process ended before its acks"
        if line.startswith(ACKED):
            acked += int(line.split()[1])
            rounds += 1
            if rounds == DEPTH or acked == written:
                return acked
    raise AssertionError("not enough acks lines in 10,000 lines of output")


async def _all_owned(relays: Sequence[Relay], shards: int) -> bool:
    return sum(len(relay.owned) for relay in relays) == shards


async def _empty(engine: AsyncEngine) -> bool:
    return await outbox_rows(engine) == 0


async def _published_some(engine: AsyncEngine, load: asyncio.Task[None], at_least: int) -> bool:
    """True once ``at_least`` rows left the table (ids are taken one per row, none rolled back)."""
    assert not load.done(), "the load ended before the relay published enough"
    async with engine.connect() as conn:
        value = await conn.scalar(text("SELECT coalesce(max(id), 0) - count(*) FROM outbox"))
    return int(value or 0) >= at_least


async def _paused_relay() -> None:
    """A relay that, after its first acks, prints how many and waits to be killed."""
    never = asyncio.Event()

    async def pause(rows: Sequence[UnsentRow]) -> None:
        print(f"{ACKED} {len(rows)}", flush=True)
        await asyncio.wait_for(never.wait(), 300)  # bounded: the test kills it long before

    await Relay(Settings(), after_ack=pause).run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(_paused_relay())
