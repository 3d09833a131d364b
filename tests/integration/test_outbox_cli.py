"""`qm outbox ls|retry` against the real database and broker: a row the broker refused, whose
dead letter was refused too (parked), is listed, sent again once its topic is fixed, and
published where it was going; refused rows by topic; one-line errors that change nothing."""

from __future__ import annotations

import json
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from click.testing import Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options
from app.outbox.relay import Relay
from app.outbox.writer import MESSAGE_ID, Outbox
from app.settings import Settings
from app.store.outbox import backlog, count_failures
from tests.integration.conftest_outbox import outbox_rows, read_topic, wait_until
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture

LIMIT = 2_000  # bytes a record batch of the strict topics may have


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    return admin


async def _strict_topics(settings: Settings, *names: str) -> None:
    admin = await _admin(settings)
    try:
        config = {"max.message.bytes": str(LIMIT)}
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=config) for name in names])
    finally:
        await admin.close()


async def _loosen(settings: Settings, name: str) -> None:
    admin = await _admin(settings)
    try:
        config = {"max.message.bytes": "1048576"}
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, config)])
    finally:
        await admin.close()


def _lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


async def _rows(engine: AsyncEngine) -> list[tuple[int, str, int, bool]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT id, topic, attempts, parked_at IS NOT NULL FROM outbox ORDER BY id")
        )
        return [(int(r[0]), str(r[1]), int(r[2]), bool(r[3])) for r in result]


async def _relay_until(settings: Settings, engine: AsyncEngine, what: str, done: Any) -> None:
    relay = Relay(settings)
    try:

        async def settled() -> bool:
            await relay.run_once()
            return bool(await done())

        await wait_until(settled, timeout=60, what=what)
    finally:
        await relay.close()


async def test_a_parked_row_is_listed_retried_and_published_where_it_was_going(
    topics: Settings, engine: AsyncEngine, qm: Qm
) -> None:
    # its value too large for its dead letter too: kept in dlt_values, the dead letter's is null
    settings = topics.model_copy(update={"outbox_max_attempts": 2, "dlt_inline_max_bytes": 1_000})
    strict, dlt = settings.topic("strict"), settings.topic("outbox.dlt")
    await _strict_topics(settings, strict)
    # the outbox's dead-letter topic refuses even that (ensure_topics made it: set its limit)
    admin = await _admin(settings)
    try:
        config = {"max.message.bytes": "200"}
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, dlt, config)])
    finally:
        await admin.close()
    box = Outbox(settings.outbox_shards)
    message_id = box.add(strict, "k", {"pad": "x" * 5_000}, [("trace", "t1")], partition=0)
    async with engine.begin() as conn:
        await box.flush(conn)

    async def parked() -> bool:
        async with engine.connect() as conn:
            return (await backlog(conn)).parked == 1

    await _relay_until(settings, engine, "the row dead-lettered, then parked", parked)

    [row] = _lines(await qm("outbox", "ls", "--json"))
    assert row["state"] == "parked" and row["topic"] == dlt and row["original_topic"] == strict
    assert row["error_class"].endswith("MessageSizeTooLargeError")
    assert row["attempts_before_dead_letter"] == 2 and row["key"] == "k"
    assert row["value_bytes"] is None  # its value waits in dlt_values
    assert _lines(await qm("outbox", "ls", "--json", "--parked", "--topic", "strict")) == [row]
    assert _lines(await qm("outbox", "ls", "--json", "--refused")) == []
    table = await qm("outbox", "ls")
    assert table.exit_code == 0 and "parked" in table.stdout and strict in table.stdout
    assert "x" * 20 not in table.stdout  # values are never shown

    await _loosen(settings, strict)  # the operator fixes what refused it
    retried = await qm("outbox", "retry", "--all-parked")
    assert retried.exit_code == 0, retried.output
    assert f"1 sent again to {strict} (1)" in retried.stdout
    assert await _rows(engine) == [(row["id"], strict, 0, False)]
    assert _lines(await qm("outbox", "ls", "--json")) == []

    async def drained() -> bool:
        return await outbox_rows(engine) == 0

    await _relay_until(settings, engine, "the row published", drained)
    [record] = await read_topic(settings, strict)
    assert json.loads(record.value) == {"pad": "x" * 5_000}
    assert record.partition == 0 and record.key == b"k"
    headers = dict(record.headers)
    assert headers[MESSAGE_ID] == message_id.encode() and headers["trace"] == b"t1"
    assert not [name for name in headers if name.startswith("qm.dlt.")]


async def test_refused_rows_by_topic_and_errors_that_change_nothing(
    settings: Settings, engine: AsyncEngine, qm: Qm
) -> None:
    events, other = settings.topic("events"), settings.topic("other")
    box = Outbox(settings.outbox_shards)
    for topic in (events, events, other, other):
        box.add(topic, "k", {"n": 1})
    async with engine.begin() as conn:
        await box.flush(conn)
    ids = [id_ for id_, *_ in await _rows(engine)]
    async with engine.begin() as conn:  # what the relay records of a refusal: one try spent
        await count_failures(conn, ids[:3])

    listed = _lines(await qm("outbox", "ls", "--json", "--refused"))
    assert [(r["id"], r["state"], r["attempts"]) for r in listed] == [
        (ids[0], "refused", 1),
        (ids[1], "refused", 1),
        (ids[2], "refused", 1),
    ]
    assert [r["id"] for r in _lines(await qm("outbox", "ls", "--json", "-t", other))] == [ids[2]]

    # all or nothing: one id that is not a stuck row (a fresh row, a missing one) changes nothing
    assert_one_red_line(
        await qm("outbox", "retry", str(ids[0]), str(ids[3]), "999999"),
        f"no parked, refused or dead-lettered outbox row {ids[3]}, 999999",
    )
    assert_one_red_line(await qm("outbox", "retry", "--all-parked"), "nothing matches")
    assert_one_red_line(await qm("outbox", "retry", "-t", "nope"), "nothing matches", "nope")
    assert_one_red_line(await qm("outbox", "retry", "12x"), "'12x' is not an outbox row id")
    assert_one_red_line(await qm("outbox", "retry"), "give row ids")
    assert_one_red_line(await qm("outbox", "retry", "1", "--all-parked"), "not both")
    assert_one_red_line(await qm("outbox", "ls", "-t", "bad topic"), "not a Kafka topic name")
    assert [attempts for _, _, attempts, _ in await _rows(engine)] == [1, 1, 1, 0]

    retried = _lines(await qm("outbox", "retry", "--topic", "events", "--json"))
    assert retried == [{"id": ids[0], "topic": events}, {"id": ids[1], "topic": events}]
    assert [attempts for _, _, attempts, _ in await _rows(engine)] == [0, 0, 1, 0]
    assert (await qm("outbox", "retry", str(ids[2]))).exit_code == 0
    assert _lines(await qm("outbox", "ls", "--json")) == []
