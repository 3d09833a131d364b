"""Test harness: real Kafka and real PostgreSQL started once per session (or taken from the env).

- ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` point at existing services instead.
- ``QM_TEST_SERVICES=containers`` starts both in containers (testcontainers; Docker or Podman)
  instead of a local KRaft broker and an embedded PostgreSQL. CI does not run this path.
- Every test gets its own database, created from a migrated template, and its own topic prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import asyncpg
import pytest
import structlog
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import make_engine
from app.db.migrate import upgrade
from app.devstack import ServiceUnavailable
from app.devstack.containers import kafka_container, postgres_container
from app.devstack.kafka import KafkaBroker
from app.devstack.postgres import EmbeddedPostgres
from app.kafka import ensure_topics
from app.sealing import private_key_text
from app.settings import Settings, get_settings

# one template per test session, so sessions of several checkouts can share one server
TEMPLATE = f"qm_template_{uuid.uuid4().hex[:8]}"


def asyncpg_dsn(url: str) -> str:
    """A plain libpq DSN for asyncpg from a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def _uncached_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A command run in-process configures structlog; loggers it cached would escape every later
    test's ``capture_logs``, so tests never cache them, and each test starts from the defaults."""
    configure = structlog.configure
    monkeypatch.setattr(
        structlog,
        "configure",
        lambda **options: configure(**{**options, "cache_logger_on_first_use": False}),
    )
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Commands read their settings once per process (cached); a test that changed the
    environment must not leave its settings to the next one."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


SERVICES = os.environ.get("QM_TEST_SERVICES", "local")
if SERVICES not in ("local", "containers"):
    pytest.exit(f"QM_TEST_SERVICES takes local or containers, not {SERVICES!r}", returncode=2)


@contextmanager
def _or_exit() -> Iterator[None]:
    """A service that cannot start ends the session with its one line (every test needs it)."""
    try:
        yield
    except ServiceUnavailable as exc:
        pytest.exit(str(exc), returncode=2)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if SERVICES == "containers":
        with _or_exit(), kafka_container() as bootstrap:
            yield bootstrap
        return
    with KafkaBroker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """URL of a database on the server from which test databases are created."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    if SERVICES == "containers":
        with _or_exit(), postgres_container() as url:
            yield url
        return
    with EmbeddedPostgres() as pg:
        yield pg.url()


@pytest.fixture(scope="session")
def template_database(postgres_admin_url: str) -> Iterator[str]:
    """A migrated template database, made once per session."""
    import asyncio

    async def make() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        finally:
            await conn.close()

    asyncio.run(make())
    url = make_url(postgres_admin_url).set(database=TEMPLATE).render_as_string(hide_password=False)
    upgrade(url)
    yield TEMPLATE
    asyncio.run(drop())


@pytest.fixture
async def database_url(postgres_admin_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh database cloned from the migrated template, dropped after the test."""
    name = f"qm_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_database}")
    finally:
        await admin.close()
    yield make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    admin = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def settings(database_url: str, kafka_bootstrap: str, topic_prefix: str) -> Settings:
    """Settings of one test: its own database and topics, fresh keys, fast sweeps."""
    return Settings(
        database_url=database_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        consumer_group=f"{topic_prefix}workers",
        secret_keys=Fernet.generate_key().decode(),
        sealing_keys=private_key_text(X25519PrivateKey.generate()),
        min_lease_seconds=1,  # tests choose short leases; the default rule has its own test
        outbox_poll_seconds=0.2,
        reaper_interval_seconds=0.2,
        consumer_session_timeout_ms=6000,
        reply_topic_partitions=8,  # enough to route replies; the test broker is shared
        console_port=0,  # `qm run all` of parallel tests: each console on a free port
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(settings, pool_size=20)
    yield eng
    await eng.dispose()


@pytest.fixture
async def topics(settings: Settings) -> Settings:
    """The test's topics, created on the real broker."""
    await ensure_topics(settings)
    return settings
