"""The pipelined relay's loop stays live against a real PostgreSQL and a real Kafka broker: it does
not spin while a round outlasts the poll, a partition sent one row a round does not stall its
shard, a failed send lets the rounds in flight end before the producer is rebuilt, and the
outbox is vacuumed without truncating it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.outbox import relay as relay_module
from app.outbox.relay import Relay
from app.outbox.relay_rounds import RelayRound
from app.outbox.writer import Outbox
from app.settings import Settings
from app.store.outbox import UnsentRow, vacuum_outbox
from tests.integration.conftest_outbox import Numbered, outbox_rows, wait_until, write_numbered
from tests.integration.test_outbox_refusals import small_topic


async def test_the_loop_waits_instead_of_spinning_while_a_round_outlasts_the_poll(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics.model_copy(update={"outbox_poll_seconds": 0.2})
    await write_numbered(engine, settings, settings.topic("events"), [("k", 0)])
    held, release, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold(rows: Sequence[UnsentRow]) -> None:
        held.set()
        await asyncio.wait_for(release.wait(), 30)

    relay = Relay(settings, after_ack=hold)
    waits = 0
    wait = relay._wait

    async def counting(*args: Any, **kwargs: Any) -> None:
        nonlocal waits
        waits += 1
        await wait(*args, **kwargs)

    relay._wait = counting  # type: ignore[method-assign]
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.wait_for(held.wait(), 15)
        started, waits = time.monotonic(), 0
        await asyncio.sleep(1.0)  # the window measured: five poll intervals with the round held
        elapsed = time.monotonic() - started
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(running, 30)
    # a wake per rebalance (every 0.2 s) and a few more; a loop with a past deadline made
    # tens of thousands of passes
    assert waits <= 5 * (elapsed / 0.2) + 5, waits
    assert await outbox_rows(engine) == 0


async def _left(engine: AsyncEngine, topic: str) -> int:
    async with engine.connect() as conn:
        query = text("SELECT count(*) FROM outbox WHERE topic = :topic")
        return int(await conn.scalar(query, {"topic": topic}) or 0)


async def test_a_partition_sent_one_row_a_round_does_not_stall_while_others_have_a_backlog(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics.model_copy(
        update={"outbox_max_attempts": 2, "outbox_batch_size": 4, "outbox_pipeline_depth": 3}
    )
    strict, events = settings.topic("strict"), settings.topic("events")
    await small_topic(settings, strict, 2_000)
    box = Outbox(settings.outbox_shards)
    for n in range(12):  # one key: the first row too large, its batch refused
        box.add(strict, "k", {"n": n, "pad": "x" * (5_000 if n == 0 else 10)})
    async with engine.begin() as conn:
        await box.flush(conn)
    backlog: list[Numbered] = [(f"e{n}", 0) for n in range(6_000)]  # every shard stays full
    await write_numbered(engine, settings, events, backlog)

    async def slow_acks(rows: Sequence[UnsentRow]) -> None:
        await asyncio.sleep(0.01)  # a broker slower to ack: the backlog lasts many rounds

    stop = asyncio.Event()
    relay = Relay(settings, after_ack=slow_acks)
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: _strict_gone(engine, strict), 60, "the strict key's rows went")
        # they went while the backlog still kept rounds full, not once it had drained
        assert await _left(engine, events) > len(backlog) // 2
        await wait_until(lambda: _strict_gone(engine, events), 120, "the backlog drained")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


async def _strict_gone(engine: AsyncEngine, topic: str) -> bool:
    return await _left(engine, topic) == 0


async def test_after_a_failed_send_no_round_starts_until_those_in_flight_end_then_a_new_producer(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics.model_copy(
        update={"outbox_max_attempts": 2, "outbox_batch_size": 4, "outbox_pipeline_depth": 3}
    )
    strict, events = settings.topic("strict"), settings.topic("events")
    await small_topic(settings, strict, 2_000)
    box = Outbox(settings.outbox_shards)
    box.add(strict, "k", {"pad": "x" * 5_000})  # alone on its partition: refused, twice
    async with engine.begin() as conn:
        await box.flush(conn)
    await write_numbered(engine, settings, events, [(f"e{n}", 0) for n in range(2_000)])

    relay = Relay(settings)
    start_round, finish_round = relay._start_round, relay._finish_round
    in_flight = 0
    starts: list[list[Any]] = []  # [rounds in flight as it started, its producer]
    ends: list[tuple[int, object]] = []  # (rows failed, the producer that sent them)

    async def noting_starts() -> Any:
        nonlocal in_flight
        entry = [in_flight, None]
        starts.append(entry)  # in order of their beginning, among the ends
        started = await start_round()
        entry[1] = relay._producer
        if started.sending is not None:
            in_flight += 1
        return started

    async def noting_ends(started: Any) -> RelayRound:
        nonlocal in_flight
        producer = relay._producer
        try:
            result = await finish_round(started)
        finally:
            in_flight -= 1
        ends.append((result.failed, producer))
        starts.append([-1, None])  # marks where the round ended among the starts
        return result

    relay._start_round = noting_starts  # type: ignore[method-assign]
    relay._finish_round = noting_ends  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: _empty(engine), 60, "published or dead-lettered")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)

    failures = [producer for failed, producer in ends if failed]
    assert failures, "the broker refused no send"
    ended = 0
    for index, (before, _) in enumerate(starts):
        if before == -1:
            failed, sent_by = ends[ended]
            ended += 1
            if failed:  # the next round starts with none in flight, on a new producer
                following = next(start for start in starts[index + 1 :] if start[0] != -1)
                assert following[0] == 0, starts
                assert following[1] is not sent_by


async def _empty(engine: AsyncEngine) -> bool:
    return await outbox_rows(engine) == 0


async def test_a_stop_while_the_relay_waits_for_its_rounds_after_a_failed_send_ends_it_soon(
    engine: AsyncEngine, topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_module, "SHUTDOWN_GRACE_SECONDS", 0.5)
    settings = topics.model_copy(update={"outbox_batch_size": 1, "outbox_pipeline_depth": 2})
    strict, events = settings.topic("strict"), settings.topic("events")
    await small_topic(settings, strict, 2_000)
    box = Outbox(settings.outbox_shards)
    box.add(events, "k", {"n": 0})  # the first round: held after its ack
    box.add(strict, "k", {"pad": "x" * 5_000})  # the second (one row a shard): refused
    async with engine.begin() as conn:
        await box.flush(conn)
    release, stop = asyncio.Event(), asyncio.Event()

    async def hold_the_first_round(rows: Sequence[UnsentRow]) -> None:
        await asyncio.wait_for(release.wait(), 60)

    relay = Relay(settings, after_ack=hold_the_first_round)
    running = asyncio.create_task(relay.run(stop))
    try:
        # the refused send failed the second round: the relay waits for the first to end
        await wait_until(lambda: _tried(engine, strict), 15, "the refused row counted")
        stop.set()
        await asyncio.wait_for(asyncio.shield(running), 5)  # within the grace, not the round's
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(running, 90)
    assert await outbox_rows(engine) == 2  # the held round was cut short: nothing deleted


async def _tried(engine: AsyncEngine, topic: str) -> bool:
    async with engine.connect() as conn:
        query = text("SELECT attempts FROM outbox WHERE topic = :topic")
        return bool(await conn.scalar(query, {"topic": topic}))


async def test_the_relays_vacuum_never_truncates_the_outbox(
    engine: AsyncEngine, topics: Settings
) -> None:
    # truncating takes an ACCESS EXCLUSIVE lock: every business transaction writing the outbox
    # would wait for it
    await write_numbered(
        engine, topics, topics.topic("events"), [(f"k{n}", 0) for n in range(2_000)]
    )
    async with engine.connect() as conn:
        await conn.execute(text("DELETE FROM outbox"))
        await conn.commit()
        size = await conn.scalar(text("SELECT pg_relation_size('outbox')"))
    assert size
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await vacuum_outbox(conn)
        assert await conn.scalar(text("SELECT pg_relation_size('outbox')")) == size
