"""The outbox relay against a real PostgreSQL and a real Kafka broker."""

from __future__ import annotations

import asyncio
import hashlib
import random
from itertools import count

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.outbox.relay import Relay
from app.outbox.writer import MESSAGE_ID, Outbox, enqueue, shard_of
from app.settings import Settings
from app.store.dlt_values import fetch_values
from app.store.outbox import count_relays, shard_owners
from tests.integration.conftest_outbox import (
    Numbered,
    judge,
    outbox_rows,
    read_topic,
    running_relays,
    wait_until,
    write_numbered,
)


class Rollback(Exception):
    """Raised inside a transaction to roll it back."""


async def test_a_rolled_back_transaction_publishes_nothing_and_a_committed_one_exactly_its_rows(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    with pytest.raises(Rollback):
        async with engine.begin() as conn:
            box = Outbox(settings.outbox_shards)
            for n in range(3):
                box.add(topic, f"gone-{n}", {"n": n})
            await box.flush(conn)
            raise Rollback
    box = Outbox(settings.outbox_shards)
    sent = {
        box.add(topic, f"key-{n % 2}", {"n": n}, headers=[("kind", "test")]): n for n in range(5)
    }
    async with engine.begin() as conn:
        await box.flush(conn)

    published_before = _sample("qm_outbox_published_total")
    latencies_before = _sample("qm_outbox_publish_latency_seconds_count")
    relay = Relay(settings)
    try:
        first = await relay.run_once()
        backlog_seen = _sample("qm_outbox_backlog_rows")  # read in the round, before publishing
        second = await relay.run_once()
    finally:
        await relay.close()

    assert (first.published, first.failed, first.waiting) == (5, 0, 0)
    assert backlog_seen == 5
    assert _sample("qm_outbox_published_total") - published_before == 5
    assert _sample("qm_outbox_publish_latency_seconds_count") - latencies_before == 5
    assert first.shards == tuple(range(settings.outbox_shards))
    assert second.idle
    assert await outbox_rows(engine) == 0
    records = await read_topic(settings, topic)
    got = {dict(r.headers)[MESSAGE_ID].decode(): r for r in records}
    assert set(got) == set(sent)
    for message_id, n in sent.items():
        record = got[message_id]
        assert record.key == f"key-{n % 2}".encode()
        assert record.value == f'{{"n":{n}}}'.encode()
        assert dict(record.headers)["kind"] == b"test"


async def test_three_relays_publish_ten_thousand_rows_in_order_per_key_and_leave_none(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    keys = [f"k{n:03d}" for n in range(200)]
    writers = 4  # each writer owns a quarter of the keys, so its numbering is the commit order
    written: list[Numbered] = []

    async def writer(own: list[str], rng: random.Random) -> None:
        numbers = {key: count() for key in own}
        for _ in range(25):
            chosen = [rng.choice(own) for _ in range(100)]
            rows = [(key, next(numbers[key])) for key in chosen]
            await write_numbered(engine, settings, topic, rows)
            written.extend(rows)

    async with running_relays(settings, 3) as relays:
        await asyncio.gather(*(writer(keys[n::writers], random.Random(n)) for n in range(writers)))
        assert len(written) == 10_000
        await wait_until(lambda: _empty(engine), 60, "the outbox drained")
        await wait_until(lambda: _fair(relays, 16), 10, "the relays shared the 16 shards fairly")

    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered(written)
    assert verdict.records - verdict.duplicates == 10_000


async def test_a_late_commit_with_a_lower_id_is_delivered_and_its_key_keeps_order(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    shards = settings.outbox_shards
    late_key = "late"
    # keys of the late row's shard: a relay that tracked "highest id sent" would skip the late row
    neighbours = [k for k in (f"n{i}" for i in range(500)) if shard_of(k.encode(), shards) == shard_of(late_key.encode(), shards)][:3]  # fmt: skip
    relay = Relay(settings)
    late = await engine.connect()
    try:
        late_tx = await late.begin()
        await enqueue(late, topic, late_key, {"key": late_key, "seq": 0}, shards=shards)
        # the same key's next row waits on the key lock until the late transaction ends
        follower = asyncio.create_task(write_numbered(engine, settings, topic, [(late_key, 1)]))
        await wait_until(lambda: _lock_waiters(engine, 1), 10, "the follower waits on the key")
        others: list[Numbered] = [(key, seq) for seq in range(5) for key in neighbours]
        await write_numbered(engine, settings, topic, others)

        before = await relay.run_once()
        assert before.published == len(others)
        assert not follower.done()

        await late_tx.commit()
        await asyncio.wait_for(follower, 10)
        after = await relay.run_once()
        assert after.published == 2
    finally:
        await late.close()
        await relay.close()

    verdict = judge(await read_topic(settings, topic))
    verdict.assert_complete_and_ordered([*others, (late_key, 0), (late_key, 1)])
    assert verdict.duplicates == 0


async def test_rows_for_a_topic_that_cannot_exist_wait_without_blocking_their_shard(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    good = settings.topic("events")
    bad = f"{settings.topic_prefix}no such topic!"  # an illegal name: never publishable
    written: list[Numbered] = [("k", 0), ("k", 1)]
    box = Outbox(settings.outbox_shards)
    box.add(bad, "k", {"key": "k", "seq": 0})
    for key, seq in written:
        box.add(good, key, {"key": key, "seq": seq})
    async with engine.begin() as conn:
        await box.flush(conn)

    relay = Relay(settings)
    try:
        result = await relay.run_once()
    finally:
        await relay.close()

    assert (result.published, result.waiting) == (2, 1)
    assert await outbox_rows(engine) == 1
    judge(await read_topic(settings, good)).assert_complete_and_ordered(written)


async def test_a_notify_wakes_the_relay_long_before_its_poll(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics.model_copy(update={"outbox_poll_seconds": 30.0})
    written: list[Numbered] = [("k", 0)]
    async with running_relays(settings, 1) as (relay,):
        await wait_until(lambda: _shares([relay], [16]), 10, "the relay took every shard")
        await write_numbered(engine, settings, settings.topic("events"), written)
        took = await wait_until(lambda: _empty(engine), 5, "the row published")
    assert took < 5 < settings.outbox_poll_seconds
    judge(await read_topic(settings, settings.topic("events"))).assert_complete_and_ordered(written)


async def test_a_stopping_relay_finishes_its_round_then_lets_go_of_its_shards(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    written: list[Numbered] = [(f"k{n}", 0) for n in range(10)]
    await write_numbered(engine, settings, settings.topic("events"), written)
    in_flight, stop = asyncio.Event(), asyncio.Event()

    async def hold_until_stopped(rows: object) -> None:
        in_flight.set()
        await stop.wait()

    relay = Relay(settings, after_ack=hold_until_stopped)
    running = asyncio.create_task(relay.run(stop))
    await asyncio.wait_for(in_flight.wait(), 10)
    stop.set()
    await asyncio.wait_for(running, 15)

    assert await outbox_rows(engine) == 0  # the round in flight deleted what was acked
    async with engine.connect() as conn:
        assert await count_relays(conn) == 0
        assert await shard_owners(conn) == {}
    judge(await read_topic(settings, settings.topic("events"))).assert_complete_and_ordered(written)


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_row_too_large_to_publish_is_dead_lettered_by_reference_and_blocks_nothing(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    topic = settings.topic("events")
    huge = b"x" * 2_000_000  # over the producer's 1 MiB request limit
    keys = [f"k{n}" for n in range(30)]
    box = Outbox(settings.outbox_shards)
    box.add(topic, "huge", huge, headers=[("trace", "t-1")])
    for key in keys:
        box.add(topic, key, {"key": key, "seq": 0})
    async with engine.begin() as conn:
        await box.flush(conn)
    dead_before = _sample(
        "qm_outbox_dead_lettered_total", {"error_class": "MessageSizeTooLargeError"}
    )

    relay = Relay(settings)
    try:
        first = await relay.run_once()
        second = await relay.run_once()  # the dead letter itself
    finally:
        await relay.close()

    assert (first.published, first.failed, first.dead_lettered) == (len(keys), 0, 1)
    assert second.published == 1
    assert await outbox_rows(engine) == 0
    seen = judge(await read_topic(settings, topic)).seen
    assert sorted(seen) == sorted(keys)
    [letter] = await read_topic(settings, settings.topic("outbox.dlt"))
    headers = dict(letter.headers)
    assert letter.key == b"huge" and letter.value is None
    assert headers["trace"] == b"t-1"
    assert headers["qm.dlt.original_topic"] == topic.encode()
    assert headers["qm.dlt.error_class"].endswith(b"MessageSizeTooLargeError")
    assert headers["qm.dlt.value_sha256"] == hashlib.sha256(huge).hexdigest().encode()
    async with engine.connect() as conn:
        stored = await fetch_values(conn, [headers["qm.dlt.value_ref"].decode()])
    assert [value.value for value in stored.values()] == [huge]
    dead_after = _sample(
        "qm_outbox_dead_lettered_total", {"error_class": "MessageSizeTooLargeError"}
    )
    assert dead_after - dead_before == 1


async def test_a_row_for_a_topic_that_cannot_exist_is_dead_lettered_and_rows_behind_it_publish(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics.model_copy(update={"outbox_max_attempts": 2})
    good = settings.topic("events")
    bad = settings.topic("no such topic!")  # a name the broker refuses: never created
    box = Outbox(settings.outbox_shards)
    box.add(bad, "k", {"n": 0})
    for n in range(1, 6):  # the same key, so the same shard, behind the refused row
        box.add(good, "k", {"n": n})
    async with engine.begin() as conn:
        await box.flush(conn)

    relay = Relay(settings)
    rounds = []
    try:
        rounds.append(await relay.run_once())

        async def dead_lettered() -> bool:
            rounds.append(await relay.run_once())
            return await outbox_rows(engine) == 0

        await wait_until(dead_lettered, timeout=60, what="the refused row to be dead-lettered")
    finally:
        await relay.close()

    assert rounds[0].published == 5  # the rows behind it did not wait for it
    assert sum(r.dead_lettered for r in rounds) == 1
    assert [r.value for r in await read_topic(settings, good)] == [
        f'{{"n":{n}}}'.encode() for n in range(1, 6)
    ]
    [letter] = await read_topic(settings, settings.topic("outbox.dlt"))
    headers = dict(letter.headers)
    assert letter.value == b'{"n":0}' and letter.key == b"k"
    assert headers["qm.dlt.original_topic"] == bad.encode()
    assert headers["qm.dlt.attempts"] == b"2"


async def _empty(engine: AsyncEngine) -> bool:
    return await outbox_rows(engine) == 0


async def _shares(relays: list[Relay], expected: list[int]) -> bool:
    return sorted(len(relay.owned) for relay in relays) == expected


async def _fair(relays: list[Relay], shards: int) -> bool:
    """Every shard owned by exactly one relay and none above ``ceil(shards / relays)``.

    Which fair split appears ([4, 6, 6] or [5, 5, 6] for 16 over 3) depends on who asked first.
    """
    owned = [relay.owned for relay in relays]
    target = -(-shards // len(relays))
    every = set().union(*owned)
    return (
        sum(map(len, owned)) == shards
        and every == set(range(shards))
        and all(len(own) <= target for own in owned)
    )


async def _lock_waiters(engine: AsyncEngine, expected: int) -> bool:
    async with engine.connect() as conn:
        waiting = await conn.scalar(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        )
    return waiting == expected
