"""The claim worker: a FastStream subscriber on ``qm.requests`` in a consumer group.

Each request is processed in one database transaction; the Kafka offset is committed only after
that transaction committed (ack after processing; a handler interrupted before it finished is not
acknowledged and the record is read again).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.message import KafkaMessage as KafkaRecordMessage
from faststream.message import StreamMessage

from app.kafka import faststream_security
from app.settings import Settings
from app.store import Database
from workers.requests import Incoming, RequestProcessor

log = structlog.get_logger()


async def raw_body(message: StreamMessage[Any]) -> bytes:
    """Decoder that hands the handler the raw bytes: parsing is ours, so bad input is classified."""
    return message.body


def incoming(message: KafkaRecordMessage) -> Incoming:
    record = message.raw_message
    assert not isinstance(record, tuple)
    return Incoming(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value or b"",
        headers=list(record.headers or ()),
    )


def build_broker(
    settings: Settings, processor: RequestProcessor, consumers: int = 1
) -> KafkaBroker:
    """The FastStream broker with the requests subscriber wired to ``processor``."""
    broker = KafkaBroker(
        settings.kafka_bootstrap_servers, security=faststream_security(settings), logger=None
    )
    extra: dict[str, Any] = {"max_workers": consumers} if consumers > 1 else {}
    subscriber = broker.subscriber(
        settings.topic("requests"),
        group_id=settings.consumer_group,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        auto_offset_reset="earliest",
        decoder=raw_body,
        no_reply=True,  # replies go through the outbox, never straight from the handler
        max_poll_interval_ms=600_000,
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=max(settings.consumer_session_timeout_ms // 5, 100),
        **extra,
    )

    @subscriber
    async def on_request(body: bytes, message: KafkaMessage) -> None:
        await processor.process(incoming(message))

    return broker


async def run_claim_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Run the claim worker until ``stop`` is set."""
    db = Database.from_settings(settings)
    processor = RequestProcessor(settings, db)
    broker = build_broker(settings, processor, settings.worker_consumers)
    await broker.start()
    log.info(
        "claim_worker_started", topic=settings.topic("requests"), group=settings.consumer_group
    )
    try:
        await stop.wait()
    finally:
        await broker.stop()
        await db.close()
        log.info("claim_worker_stopped")
