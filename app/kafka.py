"""Kafka plumbing shared by every process: client options from settings and topic creation."""

from __future__ import annotations

import contextlib
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from app.settings import Settings

# (name, partitions or None for the configured default): every topic Quartermaster uses.
TOPICS: tuple[tuple[str, int | None], ...] = (
    ("requests", None),
    ("replies", None),
    ("events", None),
    ("job-events", 1),
    ("captures", None),
    ("captures.ready", None),
    ("requests.dlt", 1),
    ("captures.dlt", 1),
)


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


def faststream_security(settings: Settings) -> BaseSecurity | None:
    """The same security settings in FastStream's terms."""
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
    """Create every topic Quartermaster uses (those that exist are left alone); return the created."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic(name), parts or settings.topic_partitions, 1)
            for name, parts in TOPICS
            if settings.topic(name) not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
                await admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    finally:
        await admin.close()
