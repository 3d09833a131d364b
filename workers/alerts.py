"""The alerts process: feeds events and dead letters to the ``AlertWatch`` (``app.alerts.watch``,
which says what fires and clears an alert) and lets it check the database every
``alert_check_seconds``, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog
from faststream.kafka import KafkaMessage
from faststream.message import StreamMessage

from app.alerts.slack import Notifier
from app.alerts.watch import AlertWatch, dead_letter_topics
from app.health import consumer_assigned

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()


async def as_message(message: StreamMessage[Any]) -> StreamMessage[Any]:
    """The handler gets the message itself (no dependency injection, as the claim worker)."""
    return message


async def run_alerts(wiring: Wiring) -> None:
    """Run the alerts process until ``wiring.stop`` is set."""
    settings, stop = wiring.settings, wiring.stop
    url = settings.slack_webhook_url
    watch = AlertWatch(
        settings, wiring.database(pool_size=2), Notifier(url.get_secret_value() if url else None)
    )
    broker = wiring.broker()
    dead_letters = set(dead_letter_topics(settings))
    subscriber = broker.subscriber(
        settings.topic("events"),
        *sorted(dead_letters),
        group_id=settings.alert_consumer_group,
        auto_offset_reset="earliest",
        decoder=as_message,
        no_reply=True,
    )

    @subscriber
    async def on_record(message: KafkaMessage) -> None:
        record = message.raw_message
        assert not isinstance(record, tuple)
        try:
            if record.topic in dead_letters:
                await watch.on_dead_letter(record.topic, list(record.headers or ()))
            else:
                await watch.on_event(record.value or b"")
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the alerts
            log.warning("alert_record_failed", topic=record.topic, error_class=type(exc).__name__)

    wiring.health.check("consumer_assigned", consumer_assigned(lambda: [subscriber.consumer]))
    await broker.start()
    log.info("alerts_started", slack=url is not None, dead_letter_topics=sorted(dead_letters))
    while not stop.is_set():
        try:
            await watch.run_once()
        except Exception as exc:  # noqa: BLE001 - the database may be away; try again next time
            log.warning("alert_check_failed", error_class=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.alert_check_seconds)
    log.info("alerts_stopped")
