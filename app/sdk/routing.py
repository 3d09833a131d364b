"""Reply routing: which partition of a shared reply topic a client reads.

Collectors share ``<prefix>replies`` by default. Each client picks one partition of it, says so in
the ``qm.reply_partition`` header of every request, and reads only that partition; Quartermaster
sends every reply of the request, and every later reply of a job it started, to that partition.
So a client fetches its own replies and those of the few clients that picked the same partition,
not everyone's (docs/performance.md). The pick hashes a random id of the client, which spreads
clients over the partitions without any coordination between them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from app.sdk.errors import QuartermasterError

METADATA_WAIT_SECONDS = 10.0  # how long a client's start waits for the reply topic to appear


def choose_partition(client_id: str, partitions: int) -> int:
    """The partition, of ``partitions``, a client with ``client_id`` reads its replies from."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    digest = hashlib.sha256(client_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def partition_to_read(
    topic: str, partitions: int, *, asked: int | None, route: bool, client_id: str
) -> int | None:
    """The one partition of ``topic`` (of ``partitions``) a client reads; None: all of them.

    A partition ``asked`` for must exist (ValueError if not); else the client picks one when it
    ``route``s its replies (on the shared topic), and reads the whole topic when not.
    """
    if asked is not None:
        if not 0 <= asked < partitions:
            raise ValueError(
                f"reply partition {asked} does not exist: {topic} has partitions 0 to "
                f"{partitions - 1}"
            )
        return asked
    return choose_partition(client_id, partitions) if route else None


async def assign_reply_partitions(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    reply_topic: str,
    pick: Callable[[int], int | None],
) -> int | None:
    """Assign ``consumer`` the partitions of ``reply_topic`` it reads, at their ends: the one
    ``pick`` names of the topic's partitions (returned), or all of them (None)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + METADATA_WAIT_SECONDS
    # A topic created moments ago may not be in every broker's metadata yet.
    while reply_topic not in await consumer.topics():
        if loop.time() > deadline:
            raise QuartermasterError(
                f"reply topic {reply_topic} does not exist (create it with `qm topics`)"
            )
        await asyncio.sleep(0.2)
    partitions = sorted(await producer.partitions_for(reply_topic))
    chosen = pick(len(partitions))
    if chosen is not None:
        partitions = [chosen]
    assigned = [TopicPartition(reply_topic, p) for p in partitions]
    consumer.assign(assigned)
    await consumer.seek_to_end(*assigned)
    # Resolve the end offsets now: a reply to the first request must not be skipped by a
    # lazy offset reset that happens after it was written.
    for partition in assigned:
        await consumer.position(partition)
    return chosen
