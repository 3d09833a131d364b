"""The secured harness: one broker with a SASL_SSL listener (SCRAM-SHA-512, a per-run certificate)
and ACLs, and one PostgreSQL that takes TCP over TLS only, started once for the secured tests.

Each test gets its own database and one of a pool of topic prefixes, whose ACLs (the deployment's
own set, ``app.kafka_acls``) are applied when the broker starts: applying ACLs runs the broker's
ACL tool, a JVM, so it is done once for the pool, not per test.

The ``settings`` fixture here replaces the plaintext one, so ``engine``, ``topics`` and the test
support that takes settings run over TLS as the ``quartermaster`` principal.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from app.db.migrate import upgrade
from app.devstack.certificates import TlsFiles, make_tls_files
from app.devstack.kafka import KafkaBroker
from app.devstack.secured_kafka import MECHANISM, BrokerSecurity
from app.devstack.tls_postgres import TlsPostgres
from app.kafka_acls import AIRFLOW, COLLECTOR, SERVICE, acl_set, merged
from app.sealing import private_key_text
from app.settings import Settings

RIVAL = "rival"  # a second collector principal: its private reply topic is not ours
PREFIXES = 24  # secured tests that may take a topic prefix in one session
TEMPLATE = f"qm_tls_template_{uuid.uuid4().hex[:8]}"


def prefix_settings(prefix: str) -> Settings:
    """The names that depend on the prefix (topics and the service's consumer groups)."""
    return Settings(
        topic_prefix=prefix,
        consumer_group=f"{prefix}workers",
        handoff_consumer_group=f"{prefix}handoff",
        alert_consumer_group=f"{prefix}alerts",
        console_port=0,  # `qm run all` of parallel tests: each console on a free port
    )


@dataclass
class SecuredStack:
    """The running secured services and what a test needs to talk to them."""

    broker: KafkaBroker
    security: BrokerSecurity
    postgres: TlsPostgres
    tls: TlsFiles
    prefixes: list[str] = field(default_factory=list)

    def take_prefix(self) -> str:
        assert self.prefixes, f"more than {PREFIXES} secured tests: raise PREFIXES"
        return self.prefixes.pop()

    def options(self, user: str) -> dict[str, Any]:
        """aiokafka options of ``user`` (bootstrap included)."""
        return {"bootstrap_servers": self.broker.bootstrap, **self.security.aiokafka_options(user)}

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    async def connect(self, database: str = "postgres") -> asyncpg.Connection:
        """An admin connection over TLS."""
        return await asyncpg.connect(
            host="127.0.0.1", port=self.postgres.port, user="postgres", database=database,
            ssl=self.ssl_context(),
        )  # fmt: skip


@pytest.fixture(scope="session")
def secured_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredStack]:
    tls = make_tls_files(Path(tmp_path_factory.mktemp("tls")))
    security = BrokerSecurity(tls)
    for user in (SERVICE, COLLECTOR, RIVAL, AIRFLOW):
        security.add_user(user)
    prefixes = [f"s{uuid.uuid4().hex[:8]}." for _ in range(PREFIXES)]
    with KafkaBroker(security=security, auto_create_topics=False) as broker, TlsPostgres(tls) as pg:
        grants = [
            grant
            for prefix in prefixes
            for grant in acl_set(prefix_settings(prefix), collectors=(COLLECTOR, RIVAL))
        ]
        broker.add_acls([grant.arguments() for grant in merged(grants)])
        stack = SecuredStack(broker, security, pg, tls, prefixes)

        async def make_template() -> None:
            conn = await stack.connect()
            try:
                await conn.execute(f"CREATE DATABASE {TEMPLATE}")
            finally:
                await conn.close()

        asyncio.run(make_template())
        # the migrations themselves run over TLS, as `qm migrate` does with QM_DATABASE_SSL
        upgrade(pg.url(TEMPLATE), connect_args={"ssl": stack.ssl_context()})
        yield stack


@pytest.fixture
async def database_url(secured_stack: SecuredStack) -> AsyncIterator[str]:
    """A fresh database on the TLS server, cloned from the migrated template."""
    name = f"qm_tls_{uuid.uuid4().hex[:12]}"
    conn = await secured_stack.connect()
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    yield secured_stack.postgres.url(name)
    conn = await secured_stack.connect()
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
def settings(secured_stack: SecuredStack, database_url: str) -> Settings:
    """Quartermaster's settings over the secured transport, as the ``quartermaster`` principal."""
    names = prefix_settings(secured_stack.take_prefix())
    return names.model_copy(
        update={
            "database_url": database_url,
            "database_ssl": True,
            "database_ssl_cafile": str(secured_stack.tls.ca_cert),
            "kafka_bootstrap_servers": secured_stack.broker.bootstrap,
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": MECHANISM,
            "kafka_sasl_username": SERVICE,
            "kafka_sasl_password": SecretStr(secured_stack.security.users[SERVICE]),
            "kafka_ssl_cafile": str(secured_stack.tls.ca_cert),
            "secret_keys": SecretStr(Fernet.generate_key().decode()),
            "sealing_keys": SecretStr(private_key_text(X25519PrivateKey.generate())),
            "min_lease_seconds": 1,
            "outbox_poll_seconds": 0.2,
            "reaper_interval_seconds": 0.2,
            "consumer_session_timeout_ms": 6000,
            "reply_topic_partitions": 4,
        }
    )


def as_principal(settings: Settings, stack: SecuredStack, user: str) -> Settings:
    """The same deployment seen by another SASL user (a collector, Airflow)."""
    return settings.model_copy(
        update={
            "kafka_sasl_username": user,
            "kafka_sasl_password": SecretStr(stack.security.users[user]),
        }
    )
