"""Kafka plumbing shared by every process: client options from settings and topic creation."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from app.settings import Settings

# the relay imports this module and neither of these: a restarted relay serves sooner
if TYPE_CHECKING:
    from faststream.security import BaseSecurity

    from app.sdk import QuartermasterClient

log = structlog.get_logger()

# (name, partitions or None for the configured default): every topic Quartermaster uses.
TOPICS: tuple[tuple[str, int | None], ...] = (
    ("requests", None),
    ("replies", None),
    ("events", None),
    ("job-events", 1),
    ("captures", None),
    ("captures.ready", None),
    ("requests.dlt", None),
    ("captures.dlt", None),
    ("outbox.dlt", None),
)
# Each dead-letter topic has as many partitions as its source, so a slow or stuck partition of
# dead letters holds back no more than one partition of their source did. ``outbox.dlt`` takes
# the rows the outbox relay could not publish (their sources are many topics).
DLT_SOURCES: dict[str, str] = {
    "requests.dlt": "requests",
    "captures.dlt": "captures",
    "outbox.dlt": "requests",
}


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options for any aiokafka client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def sdk_client(settings: Settings, **overrides: Any) -> QuartermasterClient:
    """An SDK client configured like Quartermaster's own processes (``QM_*`` environment); the
    SDK itself knows nothing of the server's settings."""
    from app.sdk import QuartermasterClient

    options = client_options(settings)
    bootstrap = options.pop("bootstrap_servers")
    arguments: dict[str, Any] = {
        "topic_prefix": settings.topic_prefix,
        "security": options,
        "idempotent_producer": settings.kafka_idempotence,
        **overrides,
    }
    return QuartermasterClient(bootstrap, **arguments)


def faststream_security(settings: Settings) -> BaseSecurity | None:
    """The same security settings in FastStream's terms."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = (
        create_ssl_context(cafile=settings.kafka_ssl_cafile) if protocol.endswith("SSL") else None
    )
    if not settings.kafka_sasl_mechanism:
        return BaseSecurity(ssl_context=ssl_context, use_ssl=ssl_context is not None)
    username = settings.kafka_sasl_username or ""
    password = (
        settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    )
    sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
    return sasl[settings.kafka_sasl_mechanism](
        username=username,
        password=password,
        ssl_context=ssl_context,
        use_ssl=ssl_context is not None,
    )


def producer_options(settings: Settings) -> dict[str, Any]:
    """Producer options: acks=all, idempotent where the broker supports it."""
    return {
        **client_options(settings),
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotence,
        "linger_ms": 1,
        "max_batch_size": 256 * 1024,
    }


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every topic Quartermaster uses (those that exist are left alone, but a dead-letter
    topic with fewer partitions than its source gets more); return the created."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        counts = topic_partitions(settings)
        wanted = [
            NewTopic(name, parts, 1) for name, parts in counts.items() if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
                await admin.create_topics(wanted)
        await _grow_dead_letter_topics(admin, settings, existing, counts)
        if settings.topic("replies") in existing:
            await _check_reply_partitions(admin, settings)
        return [topic.name for topic in wanted]
    finally:
        await admin.close()


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Every topic's full name and the partitions it should have."""
    counts = {settings.topic(name): parts or settings.topic_partitions for name, parts in TOPICS}
    # each SDK client of the shared replies topic reads one partition (app.sdk.routing)
    counts[settings.topic("replies")] = settings.reply_topic_partitions
    for name, source in DLT_SOURCES.items():
        counts[settings.topic(name)] = counts[settings.topic(source)]
    return counts


async def _grow_dead_letter_topics(
    admin: AIOKafkaAdminClient, settings: Settings, existing: set[str], counts: dict[str, int]
) -> None:
    """Give an existing dead-letter topic (made by an older version) its source's partitions."""
    names = [settings.topic(name) for name in DLT_SOURCES if settings.topic(name) in existing]
    if not names:
        return
    described = await admin.describe_topics(names)
    grow = {
        entry["topic"]: NewPartitions(counts[entry["topic"]])
        for entry in described
        if entry["error_code"] == 0 and len(entry["partitions"]) < counts[entry["topic"]]
    }
    if grow:
        await admin.create_partitions(grow)


async def _check_reply_partitions(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """Warn when the existing replies topic has fewer partitions than asked for: it is not grown
    here (a job's replies keyed to one partition would move mid-job), so clients sharing it
    spread over fewer partitions (docs/sdk.md says how to grow it)."""
    topic = settings.topic("replies")
    [entry] = await admin.describe_topics([topic])
    has = len(entry["partitions"])
    if entry["error_code"] == 0 and has < settings.reply_topic_partitions:
        log.warning(
            "reply_topic_has_fewer_partitions",
            topic=topic,
            partitions=has,
            reply_topic_partitions=settings.reply_topic_partitions,
            hint="SDK clients sharing it spread over fewer partitions; grow it with "
            "kafka-topics --alter (docs/sdk.md)",
        )
