"""The threat model, proven by the broker: the collector principal writes requests and reads replies
(the shared topic and its own), and the broker refuses it everything else."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka_acls import COLLECTOR
from app.settings import Settings
from schemas.messages import CORRELATION_ID, REPLY_TO
from tests.secured.conftest import RIVAL, SecuredStack
from tests.support.leasing import COLLECTOR_PUBLIC_KEY, make_site
from tests.support.processes import QmProcess

REFUSED_WITHIN = 30.0


async def read_one(options: dict[str, Any], topic: str, **consumer: Any) -> bytes | None:
    """Read the first record of ``topic`` (subscribed, from the start) as ``options``' user."""
    client = AIOKafkaConsumer(
        topic, auto_offset_reset="earliest", enable_auto_commit=False, **options, **consumer
    )
    try:
        await client.start()
        record = await asyncio.wait_for(client.getone(), REFUSED_WITHIN)
        return record.value
    finally:
        await client.stop()


async def write_one(options: dict[str, Any], topic: str, value: bytes, **send: Any) -> None:
    producer = AIOKafkaProducer(**options)
    try:
        await producer.start()
        await asyncio.wait_for(producer.send_and_wait(topic, value, **send), REFUSED_WITHIN)
    finally:
        await producer.stop()


async def make_topic(stack: SecuredStack, name: str) -> None:
    admin = AIOKafkaAdminClient(**stack.options("admin"))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()


async def test_secured_collector_may_not_read_requests(
    topics: Settings, secured_stack: SecuredStack
) -> None:
    service = secured_stack.options("quartermaster")
    await write_one(service, topics.topic("requests"), b"{}", key=b"k")
    with pytest.raises(TopicAuthorizationFailedError):
        await read_one(secured_stack.options(COLLECTOR), topics.topic("requests"))
    assert await read_one(service, topics.topic("requests")) == b"{}"  # the record is there


async def test_secured_collector_may_not_write_replies_nor_events(
    topics: Settings, secured_stack: SecuredStack
) -> None:
    collector = secured_stack.options(COLLECTOR)
    forged = json.dumps({"type": "job.granted", "job_id": "someone-elses"}).encode()
    for name in ("replies", "events", "job-events", "captures.ready"):
        with pytest.raises(TopicAuthorizationFailedError):
            await write_one(collector, topics.topic(name), forged)


async def test_secured_collector_may_not_read_events_nor_join_the_services_groups(
    topics: Settings, secured_stack: SecuredStack
) -> None:
    collector = secured_stack.options(COLLECTOR)
    await write_one(secured_stack.options("quartermaster"), topics.topic("events"), b"{}")
    with pytest.raises(TopicAuthorizationFailedError):
        await read_one(collector, topics.topic("events"))
    # a topic it may read, in the claim workers' group: the group is refused
    await write_one(secured_stack.options("quartermaster"), topics.topic("replies"), b"{}")
    with pytest.raises(GroupAuthorizationFailedError):
        await read_one(collector, topics.topic("replies"), group_id=topics.consumer_group)
    # in the group named after itself it reads them; in one that merely begins so, it may not
    assert await read_one(collector, topics.topic("replies"), group_id=COLLECTOR) == b"{}"
    with pytest.raises(GroupAuthorizationFailedError):
        await read_one(collector, topics.topic("replies"), group_id=f"{COLLECTOR}-other")


async def test_secured_collector_may_not_read_another_collectors_reply_topic(
    topics: Settings, secured_stack: SecuredStack
) -> None:
    theirs = topics.topic(f"replies.{RIVAL}")
    await make_topic(secured_stack, theirs)
    await write_one(secured_stack.options("quartermaster"), theirs, b"sealed-for-rival")
    with pytest.raises(TopicAuthorizationFailedError):
        await read_one(secured_stack.options(COLLECTOR), theirs)
    # nor write into it, forging a reply
    with pytest.raises(TopicAuthorizationFailedError):
        await write_one(secured_stack.options(COLLECTOR), theirs, b"forged")
    assert await read_one(secured_stack.options(RIVAL), theirs) == b"sealed-for-rival"


async def test_secured_forged_reply_to_is_answered_on_the_replies_topic_only(
    topics: Settings, engine: AsyncEngine, secured_stack: SecuredStack
) -> None:
    """A collector may write requests, so it may name any ``reply_to``: the broker lets it write
    the request, and Quartermaster (which may write every topic) refuses a ``reply_to`` outside
    the reply topics, answering on the replies topic, which the collector reads."""
    await make_site(engine, topics, capacity=1, n_accounts=1)
    collector = secured_stack.options(COLLECTOR)
    start = {
        "type": "job.start", "job_id": "forger-1", "site": "board",
        "request_id": str(uuid.uuid4()), "collector": "forger", "public_key": COLLECTOR_PUBLIC_KEY,
    }  # fmt: skip
    headers = [(CORRELATION_ID, b"c-forger"), (REPLY_TO, topics.topic("events").encode())]
    with QmProcess(topics, "all") as server:
        await write_one(
            collector, topics.topic("requests"), json.dumps(start).encode(),
            key=b"forger-1", headers=headers,
        )  # fmt: skip
        consumer = AIOKafkaConsumer(
            topics.topic("replies"), group_id=COLLECTOR,
            enable_auto_commit=False, auto_offset_reset="earliest", **collector,
        )  # fmt: skip
        await consumer.start()
        try:
            reply = await asyncio.wait_for(consumer.getone(), 60)
        except TimeoutError:
            raise AssertionError(server.output()[-4000:]) from None
        finally:
            await consumer.stop()
    answer = json.loads(reply.value or b"{}")
    assert answer["type"] == "request.invalid", answer
    assert "reply_to" in answer["error"]
    assert dict(reply.headers)[CORRELATION_ID] == b"c-forger"
