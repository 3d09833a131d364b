"""Process wiring in one place: settings → database → broker → handlers, and each one's health.

A process (claim worker, relay, reaper, ...) is a coroutine that takes a ``Wiring`` and runs until
``wiring.stop`` is set. It asks the wiring for what it needs; the wiring builds it from the
settings, adds the matching readiness check (the database answers, the broker answers, a consumer
has partitions) and closes it after the process returned, in reverse order of creation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient
from faststream.kafka import KafkaBroker

from app.health import HEALTH, ProcessHealth
from app.kafka import client_options, faststream_security
from app.settings import Settings
from app.store import Database

log = structlog.get_logger()


class KafkaProbe:
    """Answers "does the broker answer?" with one admin client, (re)connected when asked."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: AIOKafkaAdminClient | None = None
        self._lock = asyncio.Lock()  # the periodic check and /readyz may ask at once

    async def __call__(self) -> bool:
        async with self._lock:
            return await self._ask()

    async def _ask(self) -> bool:
        if self._admin is None:
            admin = AIOKafkaAdminClient(**client_options(self.settings), request_timeout_ms=2_000)
            try:
                await admin.start()
            except BaseException:
                await admin.close()
                raise
            self._admin = admin
        try:
            await self._admin.describe_cluster()
        except BaseException:
            await self.close()  # a new client next time: this one may hold a dead connection
            raise
        return True

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()


class Wiring:
    """What one process is built from; everything made here is closed when the process ends."""

    def __init__(self, settings: Settings, stop: asyncio.Event, process: str) -> None:
        self.settings = settings
        self.stop = stop
        self.process = process
        self.health: ProcessHealth = HEALTH.process(process)
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    def database(self, pool_size: int | None = None, *, pre_ping: bool = True) -> Database:
        """The process's database (readiness: it answers ``SELECT 1``)."""
        db = Database.from_settings(self.settings, pool_size, pre_ping=pre_ping)
        self.on_close(db.close)
        self.health.check("database", db.ping)
        return db

    def broker(self) -> KafkaBroker:
        """A FastStream Kafka broker for subscribers (readiness: the broker answers).

        Handlers take the message as their decoder hands it over (no dependency injection) and
        log through structlog themselves. The process starts it; the wiring stops it last.
        """
        broker = KafkaBroker(
            self.settings.kafka_bootstrap_servers,
            security=faststream_security(self.settings),
            logger=None,
            apply_types=False,
        )
        self.on_close(broker.stop)
        self.needs_kafka()
        return broker

    def needs_kafka(self) -> None:
        """Readiness includes "the broker answers" (for processes with a client of their own)."""
        probe = KafkaProbe(self.settings)
        self.on_close(probe.close)
        self.health.check("broker", probe)

    def on_close(self, closer: Callable[[], Awaitable[Any]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        """Close what the process made, last made first; a failing close does not stop the rest."""
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception as exc:  # noqa: BLE001 - closing goes on; the failure is logged
                log.warning("close_failed", process=self.process, error_class=type(exc).__name__)


def consumer_assigned(subscriber: Any) -> Callable[[], Awaitable[bool]]:
    """A readiness check: one of the subscriber's Kafka consumers has partitions assigned."""

    async def check() -> bool:
        consumers = getattr(subscriber, "consumer_subgroup", None) or [subscriber.consumer]
        return any(c is not None and c.assignment() for c in consumers)

    return check
