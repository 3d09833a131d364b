"""Reply routing in the claim worker, the reapers and the relay, against the real database and
broker: a request's ``qm.reply_partition`` header sends its replies, and every later reply of the
job it started, to that partition; a bad header is refused; a partition the topic lacks loses
nothing."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options
from app.outbox.relay import MAX_MESSAGE_BYTES, Relay
from app.outbox.writer import Outbox
from app.settings import Settings
from app.store import Database
from reapers.expired_leases import ExpiredLeases
from tests.integration.conftest_outbox import outbox_rows, read_topic, wait_until
from tests.support.leasing import (
    db_now,
    held_lease,
    make_site,
    replies,
    request,
    scalar,
    start,
)
from workers.requests import Incoming, RequestProcessor


def routed(record: Incoming, partition: str | int) -> Incoming:
    """``record`` with a ``qm.reply_partition`` header."""
    header = ("qm.reply_partition", str(partition).encode())
    return replace(record, headers=[*record.headers, header])


async def replies_with_partitions(
    engine: AsyncEngine, settings: Settings, job_id: str
) -> list[tuple[str, int | None]]:
    """(type, partition) of each reply of the job written to the outbox, in order."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT payload, partition FROM outbox WHERE topic = :topic AND key = :key"
                " ORDER BY id"
            ),
            {"topic": settings.topic("replies"), "key": job_id.encode()},
        )
        return [(json.loads(bytes(payload))["type"], partition) for payload, partition in rows]


async def test_every_reply_of_a_routed_request_goes_to_its_partition(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    first = routed(start(settings, "job-1"), 5)
    assert await processor.process(first) == "replied"
    repeat = replace(first, offset=first.offset + 1)  # the client sent it again
    assert await processor.process(repeat) == "duplicate"  # answered again, there
    lease = await held_lease(engine, settings, "job-1")
    finish = request(settings, "job.finish", "job-1", **lease, outcome="succeeded")
    assert await processor.process(routed(finish, 3)) == "replied"
    assert await replies_with_partitions(engine, settings, "job-1") == [
        ("job.granted", 5),
        ("job.granted", 5),
        ("job.finished", 3),  # each request's own reply goes where that request asked
    ]
    assert await scalar(engine, "SELECT reply_partition FROM jobs WHERE id = 'job-1'") == 5


async def test_a_queued_start_granted_by_another_request_goes_to_the_partition_it_asked_for(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(routed(start(settings, "holder"), 1))
    await processor.process(routed(start(settings, "waiter", wait_seconds=30), 6))
    lease = await held_lease(engine, settings, "holder")
    finish = request(settings, "job.finish", "holder", **lease, outcome="succeeded")
    await processor.process(routed(finish, 1))  # its transaction grants the waiter
    assert await replies_with_partitions(engine, settings, "waiter") == [
        ("job.queued", 6),
        ("job.granted", 6),
    ]


async def test_lease_lost_from_the_reaper_goes_to_the_partition_the_start_asked_for(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    await make_site(engine, settings)
    await processor.process(routed(start(settings, "dead"), 4))
    await processor.process(start(settings, "plain", wait_seconds=30))  # no header
    later = await db_now(engine) + timedelta(seconds=61)
    assert (await ExpiredLeases(settings, db).run_once(now=later)).changed == ["dead"]
    assert await replies_with_partitions(engine, settings, "dead") == [
        ("job.granted", 4),
        ("job.lease_lost", 4),
    ]
    assert await replies_with_partitions(engine, settings, "plain") == [
        ("job.queued", None),
        ("job.granted", None),  # granted by the reaper's transaction, keyed as before
    ]


@pytest.mark.parametrize(
    "value", ["-1", "abc", "", "1.5", " 3", "+3", "0x10", "2147483648", "99999999999999", "٣"]
)
async def test_a_reply_partition_that_names_no_partition_is_refused_as_invalid(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, value: str
) -> None:
    await make_site(engine, settings)
    assert await processor.process(routed(start(settings, "job-1"), value)) == "dead_lettered"
    [(kind, partition)] = await replies_with_partitions(engine, settings, "job-1")
    assert (kind, partition) == ("request.invalid", None)  # where the job id's key sends it
    [invalid] = await replies(engine, settings, "job-1")
    assert "qm.reply_partition" in invalid["error"]
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0


async def test_the_largest_partition_number_is_accepted(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    assert await processor.process(routed(start(settings, "job-1"), 2**31 - 1)) == "replied"
    assert await replies_with_partitions(engine, settings, "job-1") == [("job.granted", 2**31 - 1)]


async def test_a_bad_request_with_a_good_reply_partition_hears_request_invalid_there(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    record = routed(request(settings, "job.start", "job-1", site="board"), 2)  # no collector
    assert await processor.process(record) == "dead_lettered"
    assert await replies_with_partitions(engine, settings, "job-1") == [("request.invalid", 2)]


async def test_the_relay_sends_a_row_to_the_partition_it_names_and_a_missing_one_to_its_key(
    processor: RequestProcessor, engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=3, n_accounts=3)
    await processor.process(routed(start(settings, "routed"), 5))
    await processor.process(routed(start(settings, "beyond"), settings.reply_topic_partitions))
    await processor.process(start(settings, "plain"))
    missing_before = _sample("qm_outbox_errors_total", {"kind": "partition"})
    relay = Relay(settings)
    try:
        assert (await relay.run_once()).published >= 3
    finally:
        await relay.close()

    assert await outbox_rows(engine) == 0  # nothing lost, nothing left behind
    assert _sample("qm_outbox_errors_total", {"kind": "partition"}) - missing_before == 1
    records = await read_topic(settings, settings.topic("replies"))
    where = {record.key: record.partition for record in records}
    assert len(records) == 3
    every = list(range(settings.reply_topic_partitions))
    assert where[b"routed"] == 5
    assert where[b"beyond"] == DefaultPartitioner()(b"beyond", every, every)
    assert where[b"plain"] == DefaultPartitioner()(b"plain", every, every)


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_routed_row_refused_for_good_is_dead_lettered_where_its_key_sends_it(
    engine: AsyncEngine, topics: Settings
) -> None:
    settings = topics
    box = Outbox(settings.outbox_shards)
    too_large = b"x" * (MAX_MESSAGE_BYTES + 1)
    box.add(settings.topic("replies"), "big", too_large, partition=7)  # outbox.dlt has 6
    async with engine.begin() as conn:
        await box.flush(conn)
    missing_before = _sample("qm_outbox_errors_total", {"kind": "partition"})
    relay = Relay(settings)
    try:

        async def drained() -> bool:
            await relay.run_once()
            return await outbox_rows(engine) == 0

        await wait_until(drained, timeout=60, what="the row dead-lettered and published")
    finally:
        await relay.close()

    [letter] = await read_topic(settings, settings.topic("outbox.dlt"))
    every = list(range(settings.topic_partitions))
    assert letter.key == b"big" and letter.partition == DefaultPartitioner()(b"big", every, every)
    assert _sample("qm_outbox_errors_total", {"kind": "partition"}) == missing_before


async def test_a_row_for_a_partition_the_replies_topic_was_grown_by_reaches_it(
    engine: AsyncEngine, topics: Settings
) -> None:
    # a client started after the topic was grown picks a new partition from fresh metadata; the
    # relay, which read the topic's partitions before, must send its replies there too
    settings = topics
    replies_topic, grown = settings.topic("replies"), settings.reply_topic_partitions + 2
    relay = Relay(settings)
    try:
        await _relay_row(engine, relay, settings, "before", partition=1)  # partitions now known
        admin = AIOKafkaAdminClient(**client_options(settings))
        await admin.start()
        try:
            await admin.create_partitions({replies_topic: NewPartitions(total_count=grown)})

            async def listed() -> bool:  # as a client starting now sees the topic
                [entry] = await admin.describe_topics([replies_topic])
                return len(entry["partitions"]) == grown

            await wait_until(listed, timeout=30, what="the new partitions in the metadata")
        finally:
            await admin.close()
        await _relay_row(engine, relay, settings, "after", partition=grown - 1)
    finally:
        await relay.close()

    where = {r.key: r.partition for r in await read_topic(settings, replies_topic)}
    assert where == {b"before": 1, b"after": grown - 1}


async def _relay_row(
    engine: AsyncEngine, relay: Relay, settings: Settings, key: str, *, partition: int
) -> None:
    box = Outbox(settings.outbox_shards)
    box.add(settings.topic("replies"), key, {"type": "job.granted"}, partition=partition)
    async with engine.begin() as conn:
        await box.flush(conn)

    async def sent() -> bool:  # a partition just added may still be electing its leader
        await relay.run_once()
        return await outbox_rows(engine) == 0

    await wait_until(sent, timeout=30, what=f"the row of {key} published")
