"""The async SQLAlchemy engine: one per process, built from settings."""

from __future__ import annotations

import ssl
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings


def make_engine(settings: Settings, *, pool_size: int | None = None, **kwargs: Any) -> AsyncEngine:
    """An asyncpg engine; TLS when ``QM_DATABASE_SSL`` is set."""
    connect_args: dict[str, Any] = {}
    if settings.database_ssl:
        connect_args["ssl"] = ssl.create_default_context()
    return create_async_engine(
        settings.database_url,
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=5,
        pool_pre_ping=True,
        connect_args=connect_args,
        **kwargs,
    )
