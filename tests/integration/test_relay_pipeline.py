"""The pipelined relay against a real PostgreSQL and a real Kafka broker: rounds in flight together,
a send refused mid-stream, a rebalance and a stop while rounds are in flight."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.outbox import relay as relay_module
from app.outbox.relay import Relay
from app.outbox.writer import Outbox, shard_of
from app.settings import Settings
from app.store.outbox import UnsentRow, count_relays, shard_owners
from tests.integration.conftest_outbox import (
    Numbered,
    judge,
    outbox_rows,
    read_topic,
    running_relays,
    wait_until,
    write_numbered,
)
from tests.integration.test_outbox_refusals import small_topic


async def _record_deletes(engine: AsyncEngine) -> None:
    """Note the id of every outbox row deleted, so a test can tell it was acked first."""
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE deleted_outbox (id bigint PRIMARY KEY)"))
        await conn.execute(
            text(
                """
                CREATE FUNCTION note_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN INSERT INTO deleted_outbox VALUES (OLD.id); RETURN OLD; END $$
                """
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER outbox_deleted AFTER DELETE ON outbox"
                " FOR EACH ROW EXECUTE FUNCTION note_deleted()"
            )
        )


async def _deleted(engine: AsyncEngine) -> set[int]:
    async with engine.connect() as conn:
        return set((await conn.execute(text("SELECT id FROM deleted_outbox"))).scalars())


async def test_the_next_round_is_read_and_sent_while_a_round_awaits_and_stop_drains_both(
    engine: AsyncEngine, topics: Settings
) -> None:
    # one row a shard a round, two rows a key: every round is full, so rounds overlap
    settings = topics.model_copy(update={"outbox_pipeline_depth": 2, "outbox_batch_size": 1})
    topic = settings.topic("events")
    written: list[Numbered] = [(f"k{n}", seq) for seq in range(2) for n in range(20)]
    await write_numbered(engine, settings, topic, written)
    calls: list[list[int]] = []
    release, stop = asyncio.Event(), asyncio.Event()

    async def hold_the_first_round(rows: Sequence[UnsentRow]) -> None:
        calls.append([row.id for row in rows])
        if len(calls) == 1:  # the first round waits, acked but not deleted
            await asyncio.wait_for(release.wait(), 30)

    relay = Relay(settings, after_ack=hold_the_first_round)
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: _true(len(calls) >= 1), 15, "the first round acked")
        first = len(calls[0])
        # the relay did not wait for the first round's delete to read and send the next ones
        await wait_until(lambda: _rows_left(engine, first), 15, "all but the first round sent")
        later = {row_id for call in calls[1:] for row_id in call}
        assert set(calls[0]).isdisjoint(later)  # rows in flight are not read again
        stop.set()
        release.set()
        await asyncio.wait_for(running, 15)
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(running, 30)

    assert await outbox_rows(engine) == 0  # the round in flight at the stop deleted its rows
    async with engine.connect() as conn:
        assert await count_relays(conn) == 0 and await shard_owners(conn) == {}
    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered(written)
    assert verdict.duplicates == 0


async def _rows_left(engine: AsyncEngine, expected: int) -> bool:
    return await outbox_rows(engine) == expected


async def test_a_send_refused_mid_stream_keeps_each_keys_order_and_deletes_only_acked_rows(
    engine: AsyncEngine, topics: Settings
) -> None:
    # a topic whose broker refuses a record batch over 2,000 bytes: batches with the large row in
    # them are refused, then its partition goes one row a round until the row is dead-lettered,
    # while later rounds are in flight behind it
    settings = topics.model_copy(
        update={"outbox_max_attempts": 2, "outbox_batch_size": 4, "outbox_pipeline_depth": 3}
    )
    topic = settings.topic("strict")
    await small_topic(settings, topic, 2_000)
    await _record_deletes(engine)
    keys = ["a", "b", "c"]
    sequence = [(key, n) for n in range(12) for key in keys]
    large = ("b", 5)
    box = Outbox(settings.outbox_shards)
    for key, n in sequence:
        pad = "x" * (5_000 if (key, n) == large else 10)
        box.add(topic, key, {"key": key, "seq": n, "pad": pad})
    async with engine.begin() as conn:
        await box.flush(conn)
    acked: set[int] = set()

    async def note(rows: Sequence[UnsentRow]) -> None:
        acked.update(row.id for row in rows)

    stop = asyncio.Event()
    relay = Relay(settings, after_ack=note)
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: _empty(engine), 60, "every row published or dead-lettered")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)

    published = [json.loads(record.value) for record in await read_topic(settings, topic)]
    for key in keys:  # the partition's log, per key, is the id order, the refused row left out
        expected = [n for k, n in sequence if k == key and (k, n) != large]
        assert [row["seq"] for row in published if row["key"] == key] == expected, key
    [letter] = await read_topic(settings, settings.topic("outbox.dlt"))
    assert json.loads(letter.value)["seq"] == 5
    dead_letter_id = int(dict(letter.headers)["qm.dlt.outbox_id"])
    assert await _deleted(engine) - {dead_letter_id} <= acked  # no row deleted before its ack


async def test_a_shard_given_up_while_its_rows_are_in_flight_stays_locked_until_they_end(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    shards = settings.outbox_shards
    keys = {shard_of(f"k{n}".encode(), shards): f"k{n}" for n in range(1000)}
    written: list[Numbered] = [(keys[shard], 0) for shard in range(shards)]  # one row a shard
    await write_numbered(engine, settings, topic, written)
    held, release, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold_the_first_round(rows: Sequence[UnsentRow]) -> None:
        if not held.is_set():
            held.set()
            await asyncio.wait_for(release.wait(), 30)

    first = Relay(settings, after_ack=hold_the_first_round)
    running = asyncio.create_task(first.run(stop))
    try:
        await asyncio.wait_for(held.wait(), 15)
        in_flight = set(range(shards))
        async with running_relays(settings, 1) as (second,):
            # the first relay gives up half of its shards at its next rebalance, but keeps them
            # locked while its round holds their rows
            await wait_until(lambda: _true(len(first.owned) == 8), 10, "half given up")
            async with engine.connect() as conn:
                owners = await shard_owners(conn)
            first_pid = owners[min(first.owned)]
            assert {shard for shard, pid in owners.items() if pid == first_pid} == in_flight
            assert not second.owned
            release.set()
            await wait_until(lambda: _true(len(second.owned) == 8), 10, "the second took them")
            await wait_until(lambda: _empty(engine), 15, "the outbox drained")
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(running, 30)

    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered(written)
    assert verdict.duplicates == 0  # the second relay never read the rows in flight


async def test_the_outbox_table_is_vacuumed_after_a_few_thousand_deleted_rows(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        options = await conn.scalar(
            text("SELECT reloptions FROM pg_class WHERE relname = 'outbox' AND relkind = 'r'")
        )
    settings = dict(option.split("=", 1) for option in options or [])
    assert settings["autovacuum_vacuum_scale_factor"] == "0"
    assert int(settings["autovacuum_vacuum_threshold"]) <= 10_000
    assert settings["autovacuum_vacuum_cost_delay"] == "0"
    # nor truncated (an ACCESS EXCLUSIVE lock every writer of the outbox would queue behind)
    assert settings["vacuum_truncate"] == "false"
    async with engine.connect() as conn:
        toast = await conn.scalar(
            text(
                "SELECT t.reloptions FROM pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid"
                " WHERE c.relname = 'outbox' AND c.relkind = 'r'"
            )
        )
    assert "vacuum_truncate=false" in (toast or [])


async def _true(value: bool) -> bool:
    return value


async def _empty(engine: AsyncEngine) -> bool:
    return await outbox_rows(engine) == 0


async def test_the_relay_vacuums_the_outbox_after_deleting_enough_rows(
    engine: AsyncEngine, topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = topics
    monkeypatch.setattr(relay_module, "VACUUM_EVERY_ROWS", 200, raising=False)
    topic = settings.topic("events")
    written: list[Numbered] = [(f"k{n % 20}", n // 20) for n in range(500)]
    async with running_relays(settings, 1):
        for start in range(0, len(written), 100):  # five rounds or more
            await write_numbered(engine, settings, topic, written[start : start + 100])
        await wait_until(lambda: _empty(engine), 30, "the outbox drained")
        # the server counts a vacuum once the vacuuming session reports it (it closed)
        await wait_until(lambda: _vacuumed(engine), 15, "the relay vacuumed the outbox")
    judge(await read_topic(settings, topic)).assert_complete_and_ordered(written)


async def _vacuumed(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        count = await conn.scalar(
            text("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'outbox'")
        )
    return bool(count)
