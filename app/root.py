"""The composition root: the one place that builds what Quartermaster's processes run on, and
the one place that knows every process (``PROCESSES``, what `qm run` offers).

Once per OS process, a ``Root`` holds the settings, the secret box, the handoff targets and the
health registry (with the metrics endpoint). Each process (claim worker, relay, reaper, ...) is a
coroutine that takes a ``Wiring``, its view of the root, and runs until ``wiring.stop`` is set. It
asks the wiring for what it needs: the shared services, or its own database and broker clients
(sized for it), which the wiring builds from the settings with the matching readiness check (the
database answers, the broker answers) and closes after the process returned, last made first.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Awaitable, Callable, Coroutine
from functools import cached_property
from typing import TYPE_CHECKING, Any

import structlog

from app.health import HEALTH, Health, ProcessHealth
from app.kafka import client_options, faststream_security
from app.settings import Settings
from app.store import Database
from app.transport import TransportReport, refuse_to_start_when_refused, warn_if_in_the_clear

# a process imports only what it runs: a relay restarted after a crash serves within a second,
# without first importing the claim worker's FastStream or the alerts' Slack client
if TYPE_CHECKING:
    from aiokafka.admin import AIOKafkaAdminClient
    from faststream.kafka import KafkaBroker

    from app.crypto import SecretBox
    from app.handoff import HandoffTargets

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
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(**client_options(self.settings), request_timeout_ms=2_000)
            try:
                await admin.start()
            except BaseException:
                await admin.close()
                raise
            self._admin = admin
        try:
            # the brokers only: describe_cluster would decode every topic's metadata (150 ms of
            # CPU on a broker of 2,000 topics, every check of every process)
            await self._admin.describe_topics([])
        except BaseException:
            await self.close()  # a new client next time: this one may hold a dead connection
            raise
        return True

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()


class Root:
    """What one OS process builds once and every process in it shares (River's archetype)."""

    def __init__(self, settings: Settings, health: Health = HEALTH) -> None:
        self.settings = settings
        self.health = health  # the readiness checks and the /metrics, /healthz, /readyz endpoint

    @cached_property
    def secrets(self) -> SecretBox:
        """The secret box, built when a process first asks (the relay and alerts never do)."""
        from app.crypto import SecretBox

        return SecretBox.from_settings(self.settings)

    @cached_property
    def handoff_targets(self) -> HandoffTargets:
        """The downstream targets captures are handed to, built once for every capture."""
        from app.handoff import HandoffTargets

        return HandoffTargets(self.settings)

    def wiring(self, process: str, stop: asyncio.Event) -> Wiring:
        return Wiring(self.settings, stop, process, root=self)


class Wiring:
    """What one process is built from; everything made here is closed when the process ends."""

    def __init__(
        self, settings: Settings, stop: asyncio.Event, process: str, *, root: Root | None = None
    ) -> None:
        self.root = root or Root(settings)
        self.settings = settings
        self.stop = stop
        self.process = process
        self.health: ProcessHealth = self.root.health.process(process)
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    @property
    def secrets(self) -> SecretBox:
        """The OS process's one secret box."""
        return self.root.secrets

    @property
    def handoff_targets(self) -> HandoffTargets:
        """The OS process's one set of handoff targets."""
        return self.root.handoff_targets

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
        from faststream.kafka import KafkaBroker

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


# A process: a coroutine that runs until ``wiring.stop`` is set and then returns cleanly.
Process = Callable[[Wiring], Coroutine[Any, Any, None]]

# Every process `qm run` knows, by name, in the order `qm run all` starts them: where its
# coroutine lives, imported when it is run (``process``).
PROCESSES: dict[str, str] = {
    "worker": "workers.claim:run_claim_worker",
    "relay": "workers.relay:run_relay",
    "reaper": "reapers.runner:run_reapers",
    "handoff": "workers.handoff:run_handoff_worker",
    "alerts": "workers.alerts:run_alerts",
    "auditor": "workers.auditor:run_auditor",
    "console": "workers.console:run_console",
}


def process(name: str) -> Process:
    """The coroutine of the process ``name`` (a key of ``PROCESSES``)."""
    module, _, function = PROCESSES[name].partition(":")
    found: Process = getattr(importlib.import_module(module), function)
    return found


async def _run_one(process: Process, wiring: Wiring) -> None:
    try:
        await process(wiring)
    finally:
        await wiring.close()


async def run_processes(settings: Settings, names: list[str]) -> None:
    """Run the named processes together on one ``Root``; SIGINT/SIGTERM stop them all, a crash of
    one stops all."""
    warn_if_in_the_clear(settings)
    await refuse_to_start_when_refused(settings)
    root = Root(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    wirings = [root.wiring(name, stop) for name in names]
    tasks = [asyncio.create_task(_run_one(process(w.process), w), name=w.process) for w in wirings]
    root.health.transport = TransportReport(settings)
    if settings.metrics_port:
        root.health.serve(settings.metrics_port, loop, settings.metrics_host)
    watcher = asyncio.create_task(root.health.watch(stop), name="health")
    log.info("processes_started", processes=names)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await asyncio.gather(*tasks, watcher, return_exceptions=True)
    stopper.cancel()
    root.health.close()
    # a process that failed, first or while the others stopped (a consumer that could read no
    # more stops them all), ends the run as failed
    first = [task for task in tasks if task in done] + [task for task in tasks if task not in done]
    for task in first:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    log.info("processes_stopped", processes=names)
