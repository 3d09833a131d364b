"""`qm dev`: the whole system on embedded services, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from app.crypto import private_key_text
from app.db.migrate import upgrade
from app.devstack.postgres import EmbeddedPostgres
from app.devstack.tansu import TansuBroker
from app.kafka import ensure_topics
from app.runtime import registry, run_processes
from app.settings import Settings, get_settings

log = structlog.get_logger()


def _or_fresh_key(key: SecretStr) -> SecretStr:
    """The configured key, or a fresh one for this dev run."""
    return key if key.get_secret_value() else SecretStr(Fernet.generate_key().decode())


def _or_fresh_sealing_key(keys: SecretStr) -> SecretStr:
    if keys.get_secret_value():
        return keys
    return SecretStr(private_key_text(X25519PrivateKey.generate()))


ENV_FILE = Path(".qm-dev.env")


def write_env_file(settings: Settings, path: Path) -> None:
    """The settings of this dev stack, readable only by its owner, for `qm` commands in other shells."""
    values = {
        "QM_DATABASE_URL": settings.database_url,
        "QM_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "QM_KAFKA_IDEMPOTENCE": "false",
        "QM_TOPIC_PREFIX": settings.topic_prefix,
        "QM_SECRET_KEYS": settings.secret_keys.get_secret_value(),
        "QM_SEALING_KEYS": settings.sealing_keys.get_secret_value(),
    }
    path.touch(mode=0o600)
    path.write_text("".join(f"{name}='{value}'\n" for name, value in values.items()))
    log.info("dev_env_written", path=str(path), hint=f"set -a; . ./{path}; set +a")


def run_dev() -> None:
    """Start embedded PostgreSQL and Tansu, migrate, create topics, run every process."""
    base = get_settings()
    with EmbeddedPostgres() as pg, TansuBroker() as broker:
        settings = base.model_copy(
            update={
                "database_url": pg.url(),
                "kafka_bootstrap_servers": broker.bootstrap,
                "kafka_idempotence": False,  # Tansu has no idempotent producer
                "secret_keys": _or_fresh_key(base.secret_keys),
                "sealing_keys": _or_fresh_sealing_key(base.sealing_keys),
            }
        )
        upgrade(settings.database_url)
        asyncio.run(ensure_topics(settings))
        write_env_file(settings, ENV_FILE)
        log.info(
            "dev_stack_ready",
            database_url=settings.database_url,
            kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        )
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(run_processes(settings, list(registry())))
        finally:
            ENV_FILE.unlink(missing_ok=True)
