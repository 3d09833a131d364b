"""The raw Kafka round trip the lease bench compares against: a requester produces to a topic, an
echo task consumes each record and produces a reply, the requester consumes the reply."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from app.bench.lease_runs import REQUEST_TIMEOUT, WARMUP_SECONDS, Figure, paced
from app.kafka import client_options, producer_options
from app.settings import Settings

ECHO_PAYLOAD = b"x" * 300  # about the size of a job.start


async def echo(settings: Settings, rate: float, count: int) -> Figure:
    """Request, echo, reply through the broker at ``rate``: what Kafka alone costs."""
    figure = Figure("raw Kafka round trip (echo)", target_rate=rate, sent=count)
    asks, answers = settings.topic("bench-echo"), settings.topic("bench-echo-replies")
    await create_topics(settings, [asks, answers])
    waiting: dict[bytes, asyncio.Future[float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        requester, echoer = [AIOKafkaProducer(**producer_options(settings)) for _ in "ab"]
        for producer in (requester, echoer):
            await producer.start()
            stack.push_async_callback(producer.stop)
        inbound = await tail(settings, requester, asks, stack)
        outbound = await tail(settings, requester, answers, stack)
        tasks = [asyncio.create_task(_echo_loop(inbound, echoer, answers)),
                 asyncio.create_task(_reply_loop(outbound, waiting))]  # fmt: skip
        for task in tasks:
            stack.callback(task.cancel)
        first = time.monotonic()

        async def ask(n: int, scheduled: float) -> None:
            key = uuid.uuid4().bytes
            waiting[key] = asyncio.get_running_loop().create_future()
            try:
                await requester.send_and_wait(asks, ECHO_PAYLOAD, key=key, headers=[("id", key)])
                answered = await asyncio.wait_for(waiting[key], REQUEST_TIMEOUT)
            except (TimeoutError, OSError):
                figure.failures += 1
                return
            finally:
                waiting.pop(key, None)
            if scheduled - first >= WARMUP_SECONDS:
                figure.samples.append(answered - scheduled)

        figure.seconds = await paced(rate, count, ask)
    return figure


async def create_topics(settings: Settings, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(n, settings.topic_partitions, 1) for n in names])
    finally:
        await admin.close()


async def tail(
    settings: Settings, producer: AIOKafkaProducer, topic: str, stack: contextlib.AsyncExitStack
) -> AIOKafkaConsumer:
    """A consumer of every partition of ``topic``, from its end (as the SDK reads replies)."""
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    stack.push_async_callback(consumer.stop)
    partitions = await asyncio.wait_for(producer.partitions_for(topic), 30)
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    await consumer.seek_to_end(*assigned)
    for partition in assigned:
        await consumer.position(partition)
    return consumer


async def _echo_loop(inbound: AIOKafkaConsumer, producer: AIOKafkaProducer, topic: str) -> None:
    """The tiny echo service: every request back as a reply with the same key and headers."""
    while True:
        for records in (await inbound.getmany(timeout_ms=500)).values():
            for record in records:
                await producer.send(
                    topic, record.value, key=record.key, headers=list(record.headers)
                )


async def _reply_loop(outbound: AIOKafkaConsumer, waiting: dict[bytes, Any]) -> None:
    while True:
        for records in (await outbound.getmany(timeout_ms=500)).values():
            now = time.monotonic()
            for record in records:
                future = waiting.get(record.key or b"")
                if future is not None and not future.done():
                    future.set_result(now)
