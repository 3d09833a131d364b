"""The partitions of the topics the relay sends to, as its producer knows them.

A topic whose metadata does not come within ``TOPIC_WAIT_SECONDS`` is backed off: its rows stay in
the table and are not read again until its retry is due. Why it did not come decides whether its
rows spend a try (``outbox.attempts``): the relay asks the broker itself for the topic's metadata,
and only an answer that refuses the topic (it does not exist, it is not ours to write, its name is
invalid) is a refusal. No answer in time (a broker that stalls, a relay whose producer was just
rebuilt and has learned nothing yet) and an answer that says "not yet" (a leader being elected, a
topic being created) spend nothing: the rows wait, however long that lasts.

A row that names a partition its topic did not have when the producer read the topic's metadata
has the metadata read again first: the topic may have been grown since (a client started
afterwards picked one of the new partitions of the replies topic).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest

from app.outbox import metrics
from app.outbox.relay_rounds import Backoff
from app.store.outbox import UnsentRow

log = structlog.get_logger()

TOPIC_WAIT_SECONDS = 2.0  # how long one round waits for an unknown topic's metadata
# what the broker answers of a topic it will never take rows for: its rows spend a try
REFUSING = (UnknownTopicOrPartitionError, TopicAuthorizationFailedError, InvalidTopicError)


@dataclass(frozen=True, slots=True)
class Resolved:
    """The topics of a round: partitions of those ready; the broker's refusal of those it
    refused. A topic in neither got no answer in time: its rows wait and spend no try."""

    ready: dict[str, list[int]] = field(default_factory=dict)
    refused: dict[str, KafkaError] = field(default_factory=dict)


class TopicPartitions:
    """Each topic's partitions, learned from the producer; unavailable topics backed off."""

    def __init__(self, retry_max_seconds: float) -> None:
        self._retry_max_seconds = retry_max_seconds
        self._ready: set[str] = set()
        self._backoff: dict[str, tuple[float, Backoff]] = {}

    def forget(self) -> None:
        """A new producer: every topic is looked up again."""
        self._ready.clear()

    def in_backoff(self, now: float) -> list[str]:
        """Topics whose rows wait for their retry (``now``: ``time.monotonic()``)."""
        return [topic for topic, (retry_at, _) in self._backoff.items() if retry_at > now]

    async def resolve(self, producer: AIOKafkaProducer, rows: Sequence[UnsentRow]) -> Resolved:
        """Partitions of each topic of ``rows`` the producer knows (or learns within
        TOPIC_WAIT_SECONDS); a topic not ready is backed off, and refused if the broker says so."""
        topics = {row.topic for row in rows}
        known = sorted(topics & self._ready)
        unknown = sorted(topics - self._ready)
        ready = {topic: sorted(await producer.partitions_for(topic)) for topic in known}
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(producer.partitions_for(t), TOPIC_WAIT_SECONDS) for t in unknown),
            return_exceptions=True,
        )
        now = time.monotonic()
        missing: dict[str, BaseException] = {}
        for topic, outcome in zip(unknown, outcomes, strict=True):
            if isinstance(outcome, KafkaError | TimeoutError):
                entry = self._backoff.get(topic)
                backoff = entry[1] if entry else Backoff(self._retry_max_seconds)
                self._backoff[topic] = (now + backoff.next_delay(), backoff)
                missing[topic] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self._ready.add(topic)
                self._backoff.pop(topic, None)
                ready[topic] = sorted(outcome)
        refused = await _refusals(producer, missing)
        for topic, outcome in missing.items():
            metrics.ERRORS.labels("topic").inc()
            refusal = refused.get(topic)
            log.warning(
                "outbox_topic_unavailable",
                topic=topic,
                error_class=_name(outcome),
                refused=None if refusal is None else _name(refusal),  # None: no answer in time
            )
        await _learn_new_partitions(producer, rows, ready)
        return Resolved(ready, refused)


async def _refusals(
    producer: AIOKafkaProducer, missing: dict[str, BaseException]
) -> dict[str, KafkaError]:
    """Of the topics whose metadata did not come, those the broker refuses, by its own answer.

    The producer's wait for metadata says only "not within the time": the topic may not exist,
    or the broker may not have answered at all. So the broker is asked once more, directly; a
    topic it answers with a REFUSING error is refused, any other answer (or none in
    TOPIC_WAIT_SECONDS) refuses nothing.
    """
    # the client raises this one only when the broker's metadata said so; its "unknown topic"
    # comes from a wait that ran out, not from the broker
    refused = {
        t: exc for t, exc in missing.items() if isinstance(exc, TopicAuthorizationFailedError)
    }
    unsure = sorted(set(missing) - set(refused))
    node = producer.client.get_random_node()
    if not unsure or node is None:
        return refused
    try:
        answer = await asyncio.wait_for(
            producer.client.send(node, MetadataRequest(unsure)), TOPIC_WAIT_SECONDS
        )
    except (KafkaError, TimeoutError):
        return refused  # no answer: nothing is refused
    for error_code, topic, *_ in answer.topics:
        error = for_code(error_code)
        if topic in missing and issubclass(error, REFUSING):
            refused[topic] = error(f"the broker's metadata for {topic}: {error.message}")
    return refused


async def _learn_new_partitions(
    producer: AIOKafkaProducer, rows: Sequence[UnsentRow], ready: dict[str, list[int]]
) -> None:
    """Read the metadata again when a row names a partition its topic did not have: the topic
    may have been grown since (else the row goes to its key's partition, as before)."""
    grown = {
        row.topic
        for row in rows
        if row.topic in ready and row.partition not in (None, *ready[row.topic])
    }
    if not grown:
        return
    with contextlib.suppress(KafkaError, TimeoutError):
        await asyncio.wait_for(producer.client.force_metadata_update(), TOPIC_WAIT_SECONDS)
    for topic in grown:
        ready[topic] = sorted(producer.client.cluster.partitions_for_topic(topic) or ready[topic])


def _name(exc: BaseException) -> str:
    return type(exc).__name__
