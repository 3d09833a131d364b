"""The partitions of the topics the relay sends to, as its producer knows them.

A topic whose metadata does not come within ``TOPIC_WAIT_SECONDS`` (it does not exist yet, or the
broker is away) is backed off: its rows stay in the table and are not read again until its retry
is due. A row that names a partition its topic did not have when the producer read the topic's
metadata has the metadata read again first: the topic may have been grown since (a client started
afterwards picked one of the new partitions of the replies topic).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from app.outbox import metrics
from app.outbox.rounds import Backoff
from app.store.outbox import UnsentRow

log = structlog.get_logger()

TOPIC_WAIT_SECONDS = 2.0  # how long one round waits for an unknown topic's metadata


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

    async def resolve(
        self, producer: AIOKafkaProducer, rows: Sequence[UnsentRow]
    ) -> dict[str, list[int]]:
        """Partitions of each topic of ``rows`` the producer knows (or learns within
        TOPIC_WAIT_SECONDS); a topic missing from the result is backed off."""
        topics = {row.topic for row in rows}
        known = sorted(topics & self._ready)
        unknown = sorted(topics - self._ready)
        ready = {topic: sorted(await producer.partitions_for(topic)) for topic in known}
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(producer.partitions_for(t), TOPIC_WAIT_SECONDS) for t in unknown),
            return_exceptions=True,
        )
        now = time.monotonic()
        for topic, outcome in zip(unknown, outcomes, strict=True):
            if isinstance(outcome, KafkaError | TimeoutError):
                entry = self._backoff.get(topic)
                backoff = entry[1] if entry else Backoff(self._retry_max_seconds)
                self._backoff[topic] = (now + backoff.next_delay(), backoff)
                metrics.ERRORS.labels("topic").inc()
                log.warning("outbox_topic_unavailable", topic=topic, error_class=_name(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self._ready.add(topic)
                self._backoff.pop(topic, None)
                ready[topic] = sorted(outcome)
        await _learn_new_partitions(producer, rows, ready)
        return ready


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
