"""Run Alembic migrations programmatically (used by `qm migrate` and the test harness)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from app.database_urls import asyncpg_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str, connect_args: dict[str, Any] | None = None) -> Config:
    """An Alembic config pointing at our migrations and the given database (any PostgreSQL URL
    form, read with the project's driver as the settings read it); ``connect_args`` are the
    driver's connection options (TLS: ``app.db.engine.connect_args``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", asyncpg_url(database_url).replace("%", "%%"))
    cfg.attributes["connect_args"] = connect_args or {}
    return cfg


def upgrade(
    database_url: str, revision: str = "head", connect_args: dict[str, Any] | None = None
) -> None:
    """Apply migrations up to ``revision``."""
    command.upgrade(alembic_config(database_url, connect_args), revision)


def downgrade(
    database_url: str, revision: str = "base", connect_args: dict[str, Any] | None = None
) -> None:
    """Revert migrations down to ``revision``."""
    command.downgrade(alembic_config(database_url, connect_args), revision)
